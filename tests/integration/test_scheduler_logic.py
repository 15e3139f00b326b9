"""dcpp's scheduler logic (`DcppRuntime`, which imports no vLLM module) on fake requests: no
engine is started, so these run in seconds (also in `make test-fast`). The engine-level
behaviour is covered by test_vllm_engine.py."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from dcpp.tooling.fake_engine import (  # noqa: F401 - shared stand-ins
    BUDGET,
    SCHED,
    FakeExecutor,
    isolated_runtime,
    req,
    sched,
    true_time,
)


def runtime(tmp_path, monkeypatch, executor=None, **kw):
    return isolated_runtime(monkeypatch, tmp_path, executor, **kw)


def planned(rt):
    """Requests with a plan in progress."""
    return {s.request_id for s in rt.requests if s.plan is not None}


def test_profiles_every_stage_takes_slowest_and_caches(tmp_path, monkeypatch):
    ex = FakeExecutor()
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.profile.source == "profiled" and rt.profile.passes == ex.calls > 0
    # Stage 1 is 10% slower: the fit follows the slowest stage.
    assert rt.model.predict_time(512, 4096) == pytest.approx(1.1 * true_time(512, 4096), rel=0.1)
    ex2 = FakeExecutor()
    rt2 = runtime(tmp_path, monkeypatch, executor=ex2)
    assert rt2.profile.source == "cache" and rt2.profile.passes == 0 and ex2.calls == 0


@pytest.mark.parametrize("executor", [FakeExecutor(error=RuntimeError("worker died")),
                                      FakeExecutor(fn=lambda n, h: 0.01)])
def test_failed_or_degenerate_profile_falls_back_to_static(tmp_path, monkeypatch, executor):
    rt = runtime(tmp_path, monkeypatch, executor=executor)
    assert rt.model is None
    rt.begin_step(sched())
    assert rt.cap(SCHED, req("a", 5000), 0, BUDGET) == BUDGET  # vLLM's own chunk


def test_profiling_past_its_time_budget_falls_back_to_static(tmp_path, monkeypatch, caplog):
    """Start-up profiling never outlives its budget (DCPP_PROFILE_TIMEOUT_S, by default a third
    of vLLM's engine start-up timeout): each RPC gets only the time left, and when it is spent
    vLLM serves with static chunks and a warning naming the knobs."""
    import logging
    import time

    class SlowExecutor(FakeExecutor):
        timeouts: list = []

        def collective_rpc(self, method, timeout=None, **kw):
            self.timeouts.append(timeout)
            time.sleep(0.1)
            return super().collective_rpc(method, timeout=timeout, **kw)

    monkeypatch.setenv("DCPP_PROFILE_TIMEOUT_S", "0.5")
    ex = SlowExecutor()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert time.monotonic() - t0 < 5.0
    assert rt.model is None and rt.profile.source == "none"
    assert 0 < rt.profile.passes == ex.calls < 17  # stopped part-way through one profile
    assert all(t is not None and t <= 0.5 for t in ex.timeouts), ex.timeouts
    assert "DCPP_PROFILE_TIMEOUT_S" in caplog.text and "static chunking" in caplog.text
    rt.begin_step(sched())
    assert rt.cap(SCHED, req("a", 5000), 0, BUDGET) == BUDGET


def test_noisy_profile_is_retried_once_with_more_repeats(tmp_path, monkeypatch):
    """A first profile too noisy to fit (a busy machine) is rejected; the retry, each pass the
    best of twice as many runs, succeeds and counts all passes."""
    import random

    rng = random.Random(0)
    ex = FakeExecutor()
    ex.fn = lambda n, h: rng.uniform(1e-3, 1e-1) if ex.calls <= 17 else true_time(n, h)
    monkeypatch.setenv("DCPP_PROFILE_REPEATS", "2")
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.model is not None and rt.profile.source == "profiled"
    assert rt.profile.passes == ex.calls == 34
    assert ex.repeats == [2] * 17 + [4] * 17


def test_degenerate_profile_falls_back_after_the_retry(tmp_path, monkeypatch):
    ex = FakeExecutor(fn=lambda n, h: 0.01)  # timings that do not depend on the chunk
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.model is None and rt.profile.source == "none"
    assert rt.profile.passes == ex.calls == 34


def test_single_prefill_follows_plan_and_decodes_untouched(tmp_path, monkeypatch):
    rt = runtime(tmp_path, monkeypatch)
    r = req("a", 6000)
    plan = rt.predictors["pipeline"].plan(6000, history=0)
    done = []
    while r.num_computed_tokens < r.num_tokens:
        s = sched([r])
        rt.begin_step(s)
        c = rt.cap(SCHED, r, r.num_computed_tokens, BUDGET)
        r.num_computed_tokens += c
        s.requests = {"a": r}
        rt.end_step(s, NS(num_scheduled_tokens={"a": c}))
        done.append(c)
    assert done == plan
    assert "a" not in planned(rt)
    rt.begin_step(sched([r]))
    assert rt.cap(SCHED, req("d", 10, computed=9), 9, 1) == 1


def test_forget_drops_plans_and_prefill_timers(tmp_path, monkeypatch):
    """What the scheduler calls for aborted requests (vLLM's finish_requests; None: all)."""
    rt = runtime(tmp_path, monkeypatch)
    reqs = [req("a", 6000), req("b", 5000), req("c", 4000)]
    for r in reqs:  # equal-time requests are planned even beside other prefills
        r.sampling_params = NS(extra_args={"dcpp_plan": "equal_time"})
    s = sched(reqs, budget=3 * BUDGET)
    s.requests = {r.request_id: r for r in reqs}
    rt.begin_step(s)
    granted = {r.request_id: rt.cap(SCHED, r, 0, BUDGET) for r in reqs}
    for r in reqs:
        r.num_computed_tokens = granted[r.request_id]
    rt.end_step(s, NS(num_scheduled_tokens=granted))
    assert planned(rt) == {"a", "b", "c"} and set(rt.prefills.timed()) == {"a", "b", "c"}
    rt.free(["a", "unknown"])
    assert planned(rt) == {"b", "c"} and set(rt.prefills.timed()) == {"b", "c"}
    rt.free(None)
    assert not planned(rt) and not rt.prefills.timed()


def test_several_prefills_share_a_time_budget_and_decodes_are_reserved(tmp_path, monkeypatch):
    """The first prefill takes its planned chunk and sets the step's time; the next one gets
    the largest aligned chunk that keeps the step's predicted time within it (hand-checked by
    scanning every aligned size), never less than the floor, never 0."""
    rt = runtime(tmp_path, monkeypatch)
    decodes = [req(f"d{i}", 100, computed=99) for i in range(8)]
    rt.begin_step(sched(decodes))
    assert rt.sizer._step.prefill_room == BUDGET - 8
    a = req("a", 8000, computed=4096)
    c1 = rt.cap(SCHED, a, 4096, BUDGET)
    assert c1 == rt.predictors["pipeline"].plan(8000 - 4096, history=4096)[0]
    target = rt.model.predict_time(c1, 4096)
    c2 = rt.cap(SCHED, req("b", 8000), 0, BUDGET)
    fits = [x for x in range(64, BUDGET + 1, 64)
            if rt.model.predict_batch([(c1, 4096), (x, 0)]) <= target * (1 + 1e-12)]
    expect = min(max(fits, default=0), BUDGET - 8 - c1, 8000)
    assert c2 == max(expect, rt.sizer.floor), (c2, fits, rt.sizer.floor)
    assert c2 > 0


def test_plan_off_and_prefix_hit(tmp_path, monkeypatch):
    rt = runtime(tmp_path, monkeypatch)
    r = req("a", 6000)
    r.sampling_params = NS(extra_args={"dcpp_plan": "off"})
    rt.begin_step(sched())
    assert rt.cap(SCHED, r, 0, BUDGET) == BUDGET
    hit = req("b", 6000, computed=2048)
    rt.begin_step(sched())
    c = rt.cap(SCHED, hit, 2048, BUDGET)
    assert rt.plan_log["b"][0][0] == 2048
    assert c == rt.predictors["pipeline"].plan(6000 - 2048, history=2048)[0]


def test_no_timing_no_bookkeeping(tmp_path, monkeypatch):
    rt = runtime(tmp_path, monkeypatch, need_timing=False)
    assert rt.cal is None and not rt.stage_timing
    r = req("a", 3000)
    s = sched([r])
    rt.begin_step(s)
    c = rt.cap(SCHED, r, 0, BUDGET)
    r.num_computed_tokens = c
    s.requests = {"a": r}
    out = NS(num_scheduled_tokens={"a": c})
    rt.end_step(s, out)
    assert len(rt.ledger) == 0
    rt.on_output(out, 1.0, idle=True)
    assert rt.cal is None and rt.phase.value == "profiled"
    rt.close()
    assert not list(tmp_path.glob("*.calibration.json"))  # nothing learnt, nothing saved


def test_draft_tokens_are_not_prefill():
    """A decode with 2 speculative tokens schedules 3 tokens at the sequence's end: not a
    prefill; a prompt's last 3 tokens are."""
    from dcpp.integration.vllm import vllm_compat

    decode = NS(num_tokens=101, num_computed_tokens=103, num_prompt_tokens=90)  # 100 + 3 new
    prompt = NS(num_tokens=500, num_computed_tokens=500, num_prompt_tokens=500)
    s = NS(requests={"d": decode, "p": prompt})
    got = vllm_compat.scheduled_step(s, NS(num_scheduled_tokens={"d": 3, "p": 3})).requests
    assert [(r.request_id, r.tokens, r.history, r.prefill, r.total) for r in got] == [
        ("d", 3, 100, False, 101), ("p", 3, 497, True, 500)]


def test_encoder_spans_and_mamba_alignment_come_from_vllms_settings():
    from dcpp.integration.vllm import vllm_compat

    image = NS(mm_position=NS(offset=100, length=576))
    r = NS(mm_features=[image])
    split_ok = NS(scheduler_config=NS(disable_chunked_mm_input=False))
    whole = NS(scheduler_config=NS(disable_chunked_mm_input=True))
    assert vllm_compat.unsplittable_encoder_spans(split_ok, r) == ()
    assert vllm_compat.unsplittable_encoder_spans(whole, r) == ((100, 576),)
    assert vllm_compat.mamba_block_align(whole) == 1
    mamba = NS(need_mamba_block_aligned_split=True, cache_config=NS(block_size=528))
    assert vllm_compat.mamba_block_align(mamba) == 528
