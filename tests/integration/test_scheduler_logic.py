"""dcpp's scheduler logic (`DcppRuntime`, which imports no vLLM module) on fake requests: no
engine is started, so these run in seconds (also in `make test-fast`). The engine-level
behaviour is covered by test_vllm_engine.py."""

from __future__ import annotations

from dcpp.online.stage_timing import step_is_timed

import concurrent.futures

from types import SimpleNamespace as NS

import pytest

from dcpp.tooling.fake_engine import (  # noqa: F401 - shared stand-ins
    BUDGET,
    MAX_LEN,
    SCHED,
    FakeExecutor,
    done_future,
    driven_runtime,
    fake_vllm_config,
    req,
    sched,
    true_time,
)


def runtime(tmp_path, monkeypatch, executor=None, **kw):
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DCPP_BUBBLE_SAMPLE_EVERY", raising=False)  # the default timing rate
    return driven_runtime(executor, **kw)


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


@pytest.mark.parametrize("executor", [FakeExecutor(fail=True),
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


def _run_interval_steps(rt, n, fn, start=0):
    """`n` single-prefill steps measured only by their output intervals (no stage timing)."""
    t = rt.ledger.last_output_t if rt.ledger.last_output_t is not None else 0.0
    rt.ledger.last_output_t = t
    for i in range(start, start + n):
        c, h = 256 + 64 * (i % 8), 512 * (i % 16)
        r = req(f"r{i}", h + c + 100, computed=h + c)
        s = sched([r])
        s.requests = {r.request_id: r}
        out = NS(num_scheduled_tokens={r.request_id: c})
        rt.end_step(s, out)
        rt.ledger._queue[-1].scheduled_at = t - 1e-4  # queued behind the previous step
        t += fn(c, h)
        rt.on_output(out, t)


@pytest.mark.parametrize("source", ["intervals", "stage times"])
def test_one_calibrator_for_both_sources(tmp_path, monkeypatch, source):
    """The same rules learn a 1.5x slower engine from step intervals (no per-stage timing)
    and from per-stage times."""
    ex = FakeExecutor(step_timing=source == "stage times")
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.cal is not None and rt.stage_timing == (source == "stage times")
    if source == "intervals":
        _run_interval_steps(rt, 128, lambda c, h: 1.5 * true_time(c, h))
    else:
        _run_timed_steps(rt, ex, 128, 0.0, factor=1.5)
    assert rt.cal.num_refits > 0 and rt.cal.median_error() < 0.05
    assert rt.cal.model.predict_time(512, 4096) == pytest.approx(
        1.5 * true_time(512, 4096), rel=0.05)


@pytest.mark.parametrize("threshold, forced", [(0.10, True), (5.0, False)])
def test_drift_threshold_acts_on_the_interval_source(tmp_path, monkeypatch, threshold,
                                                     forced):
    """After calibration the engine gets 2x slower: with drift_threshold 0.10 the recent
    errors force a refit within 8 steps; with 5.0 nothing is forced (the periodic refit and
    the fast scale remain)."""
    from dcpp.online.calibration import calibrator

    monkeypatch.setattr(calibrator, "REFIT_EVERY", 10_000)  # only drift refits the base
    ex = FakeExecutor()
    vc_block = {"drift_threshold": threshold}
    rt = runtime(tmp_path, monkeypatch, executor=ex, extra=vc_block)
    _run_interval_steps(rt, 64, true_time)
    events = rt.cal.drift_events
    _run_interval_steps(rt, 12, lambda c, h: 2.0 * true_time(c, h), start=64)
    assert (rt.cal.drift_events > events) == forced


def test_stage_timing_calibrates_compute_and_learns_overhead(tmp_path, monkeypatch):
    """Workers' per-stage compute times calibrate the model (slowest stage); the step interval
    minus that compute, on steady steps only (bubbles of growing steps excluded), is the
    per-step overhead, which the planning model adds to c."""
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.stage_timing
    overhead = 4e-3
    _run_timed_steps(rt, ex, 64, overhead)
    assert rt.cal.num_refits > 0
    assert rt.cal.median_error() < 0.05
    assert rt.cal.overhead_s() == pytest.approx(overhead, rel=0.05)
    assert rt.model.c == pytest.approx(rt.cal.model.c + rt.cal.overhead_s())


def test_a_few_steps_from_one_region_do_not_rescale_the_whole_model(tmp_path, monkeypatch):
    """The fast scale follows the machine, not one region: right after a refit, the tail of one
    long prompt running 40% slower than the model (a shape error there, or a burst of noise)
    must not make every other step 40% dearer; a machine that really got slower (every step)
    is followed within a few dozen steps."""
    from dcpp.online import runtime as sched_mod

    monkeypatch.setattr(sched_mod, "TIMING_SAMPLE_EVERY", 1)  # the scale's rule, not sampling
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 64, 0.0, factor=1.0)  # the 64th step triggers a refit
    refits = rt.cal.num_refits
    assert refits > 0
    _run_timed_steps(rt, ex, 8, 0.0, factor=1.4, shape=lambda i: (256, 14336 + 256 * i))
    assert rt.cal.num_refits - refits <= 1  # not a new base fit: the fast scale's doing
    small = rt.cal.model.predict_time(512, 1024) / true_time(512, 1024)
    assert small == pytest.approx(1.0, abs=0.1), f"a short prompt now predicted {small:.2f}x"
    _run_timed_steps(rt, ex, 48, 0.0, factor=1.5)
    assert rt.cal.model.predict_time(512, 1024) / true_time(512, 1024) == pytest.approx(
        1.5, rel=0.1)


def test_calibrated_workers_time_one_step_in_eight_and_every_step_on_drift(tmp_path,
                                                                          monkeypatch):
    """Until calibrated every step is timed (a device sync each); then 1 in 8; when the
    machine gets slower the error rises above drift_threshold and every step is timed again
    until the model follows."""
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 64, 4e-3)
    assert ex.synced == 64 and rt.timing.every == 8
    ex.synced = 0
    _run_timed_steps(rt, ex, 400, 4e-3)
    assert rt.timing.every == 8
    assert 400 / 16 < ex.synced < 400 / 4, ex.synced  # about 1 in 8
    assert rt.stats()["timed_steps"] < rt.stats()["tracked_steps"]
    ex.synced = 0
    _run_timed_steps(rt, ex, 200, 4e-3, factor=2.0)  # twice as slow from now on
    assert ex.synced > 200 / 4  # drift: every step timed for a while
    assert rt.cal.model.predict_time(512, 1024) == pytest.approx(
        2.0 * true_time(512, 1024), rel=0.1)


def _shape(i):
    """(chunk, history) of step i: shapes mostly grow step to step; every 4th step repeats the
    previous shape (a steady pipeline for a moment)."""
    k = i - (i + 1) // 4
    return 256 + 64 * (k % 8), 512 * (k % 16)


def _run_timed_steps(rt, ex, n, overhead, factor=1.3, shape=_shape):
    """`n` single-prefill steps whose stages take 0.9x and 1.0x of factor * true_time, spaced
    by that plus `overhead` seconds, plus a pipeline bubble as long as the growth over the
    previous step (what a real pipeline shows when steps grow); per-stage times come back
    through the fake drain RPC."""
    from dcpp.integration.vllm import vllm_compat

    slower = lambda c, h: factor * true_time(c, h)  # noqa: E731 - the real stage is slower
    t, prev = (rt.ledger.last_output_t or 0.0), None
    rt.ledger.last_output_t = t
    for i in range(n):
        c, h = shape(i)
        r = req(f"r{i}", h + c + 100)
        r.num_computed_tokens = h + c
        s = sched([r])
        s.requests = {r.request_id: r}
        out = NS(num_scheduled_tokens={r.request_id: c})
        rt.end_step(s, out)
        rt.ledger._queue[-1].scheduled_at = t - 1e-4  # queued behind the previous step
        fp = vllm_compat.step_fingerprint(out)
        if step_is_timed(fp, ex.every):  # what a worker's sampled timer records
            ex.synced += 1
            ex.queued.append((fp, (0.9 * slower(c, h), slower(c, h))))
        bubble = max(0.0, slower(c, h) - prev) if prev is not None else 0.0
        t += slower(c, h) + overhead + bubble
        prev = slower(c, h)
        rt.on_output(out, t, idle=(i % 8 == 7))


def test_metrics_endpoint_reports_chunks_errors_and_closes(tmp_path, monkeypatch):
    pytest.importorskip("prometheus_client", reason="needs prometheus_client (comes with vllm)")
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex, metrics_port=port)
    try:
        _run_timed_steps(rt, ex, 16, 4e-3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        rt.close()
    values = {line.split(" ")[0]: float(line.split(" ")[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["dcpp_prefill_chunk_tokens_count"] == 16
    assert values["dcpp_prefill_chunk_tokens_sum"] == sum(_shape(i)[0] for i in range(16))
    assert values["dcpp_chunk_latency_prediction_error_count"] == len(rt.cal.step_log) == 16
    assert values["dcpp_profile_passes"] == rt.profile.passes > 0
    assert values["dcpp_dynamic_chunking_active"] == 1
    assert values["dcpp_latency_model_scale"] == pytest.approx(rt.cal.scale)
    assert values["dcpp_step_overhead_seconds"] == pytest.approx(rt.cal.overhead_s())
    # Closed with the runtime: a restarted engine's endpoint can take the port again.
    from dcpp.integration.vllm.metrics import start_metrics as restart

    again = restart(port)
    assert again is not None
    again.close()


def test_whole_prefill_times_teach_the_per_step_cost(tmp_path, monkeypatch):
    """Planned requests that run alone and take `extra` s per step longer than the compute
    model's pipeline TTFT of their chunks: that is the per-step cost the planner charges, so
    later plans use fewer chunks."""
    from dcpp.chunker.planner import plan_cost
    from dcpp.online import runtime as sched_mod
    from dcpp.integration.vllm import vllm_compat

    clock = [100.0]
    monkeypatch.setattr(sched_mod, "time", NS(monotonic=lambda: clock[0]))
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    chunks_before = rt.predictors["pipeline"].plan(6000, history=0)
    extra = 0.02
    for k in range(4):
        r = req(f"p{k}", 6000)
        s = sched([r])
        s.requests = {r.request_id: r}
        t_first = clock[0]
        while r.num_computed_tokens < r.num_tokens:
            rt.begin_step(s)
            h = r.num_computed_tokens
            c = rt.cap(SCHED, r, h, min(BUDGET, r.num_tokens - h))
            r.num_computed_tokens += c
            out = NS(num_scheduled_tokens={r.request_id: c})
            rt.end_step(s, out)
            ex.queued.append((vllm_compat.step_fingerprint(out),
                              (true_time(c, h), 1.1 * true_time(c, h))))
            clock[0] += 1.1 * true_time(c, h)
            done = r.num_computed_tokens >= r.num_tokens
            if done:  # the prefill's output: the compute model's TTFT plus `extra` per step
                chunks = rt.chunk_log[r.request_id]
                clock[0] = t_first + plan_cost(rt.cal.model, chunks, 2) + extra * (
                    len(chunks) + 1)
            rt.on_output(out, clock[0], idle=done)
        clock[0] += 1.0
    assert len(rt.cal.overhead.request_gaps) == 4
    assert rt.cal.overhead_s() == pytest.approx(extra, rel=0.02)
    assert rt.model.c == pytest.approx(rt.cal.model.c + extra)
    assert len(rt.predictors["pipeline"].plan(6000, history=0)) < len(chunks_before)


def test_online_refit_corrects_a_wrong_profile_shape(tmp_path, monkeypatch):
    """A start-up profile with the wrong shape (4x the chunk^2 cost) is corrected by refits on
    the real step timings; a single scale factor could not match all chunk sizes."""
    wrong = lambda c, h: 2e-3 + 2e-6 * c + 4e-9 * c * h + 8e-9 * c * c  # noqa: E731
    ex = FakeExecutor(fn=wrong, step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 128, 4e-3)  # real stages: 1.3 * true_time at the slowest
    assert rt.cal.last_refit_error is None and rt.cal.base is not rt.cal.profile_model
    for c, h in [(256, 0), (704, 7680), (512, 4096), (320, 6144)]:
        assert rt.cal.model.predict_time(c, h) == pytest.approx(1.3 * true_time(c, h),
                                                                    rel=0.03)


def test_restart_starts_from_the_saved_calibration(tmp_path, monkeypatch):
    """What calibration learnt (refit window, per-step overhead) is saved at shutdown beside the
    profile; a restart with the same cache key loads it and plans like the engine it replaces,
    without profiling and without waiting for new step timings."""
    from dcpp.online.calibration import store as calibration_store

    wrong = lambda c, h: 2e-3 + 2e-6 * c + 4e-9 * c * h + 8e-9 * c * c  # noqa: E731
    ex = FakeExecutor(fn=wrong, step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    overhead = 4e-3
    _run_timed_steps(rt, ex, 96, overhead)
    path = calibration_store.path_for(rt.profile.path)
    import os

    assert os.path.exists(path)  # saved when the engine went idle, before any shutdown
    rt.close()
    assert rt.cal.overhead_s() == pytest.approx(overhead, rel=0.05)

    ex2 = FakeExecutor(fn=wrong, step_timing=True)
    rt2 = runtime(tmp_path, monkeypatch, executor=ex2)
    assert rt2.profile.source == "cache" and ex2.calls == 0
    assert len(rt2.cal.samples) == len(rt.cal.samples) > 64 and rt2.cal.num_observations == 0
    assert rt2.cal.overhead_s() == pytest.approx(rt.cal.overhead_s())
    assert rt2.model.c == pytest.approx(rt2.cal.model.c + overhead, rel=0.05)
    for c, h in [(256, 0), (704, 7680), (512, 4096)]:  # the profile's shape is corrected
        assert rt2.cal.model.predict_time(c, h) == pytest.approx(1.3 * true_time(c, h),
                                                                     rel=0.03)
    assert rt2.predictors["pipeline"].plan(6000) == rt.predictors["pipeline"].plan(6000)
    rt2.close()

    # Re-profiling (the profile file gone) makes the calibration obsolete: it is removed.
    os.unlink(rt.profile.path)
    rt3 = runtime(tmp_path, monkeypatch, executor=FakeExecutor(fn=wrong, step_timing=True))
    assert rt3.profile.source == "profiled" and not os.path.exists(path)
    assert len(rt3.cal.samples) == 0 and rt3.cal.overhead_s() == 0.0


@pytest.mark.parametrize("damage", ["not json", "other key", "other profile", "bad sample"])
def test_unusable_calibration_file_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog,
                                                             damage):
    import json
    import logging

    from dcpp.online.calibration import store as calibration_store

    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 16, 4e-3)
    rt.close()
    path = calibration_store.path_for(rt.profile.path)
    doc = json.loads(open(path).read())
    if damage == "not json":
        text = "{"
    else:
        if damage == "other key":
            doc["cache_key"]["max_model_len"] = 1
        elif damage == "other profile":
            doc["profile_digest"] = "0" * 16
        else:
            doc["step_samples"][3][1] = -1.0
        text = json.dumps(doc)
    with open(path, "w") as f:
        f.write(text)
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        rt2 = runtime(tmp_path, monkeypatch, executor=FakeExecutor(step_timing=True))
    assert "ignoring calibration file" in caplog.text
    assert rt2.profile.source == "cache" and rt2.model is not None
    assert len(rt2.cal.samples) == 0 and rt2.cal.overhead_s() == 0.0


def test_unwritable_calibration_file_warns_once_and_serving_goes_on(tmp_path, monkeypatch, caplog):
    import logging

    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    rt.saver.path = str(tmp_path / "no-such-dir" / "x.calibration.json")
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        _run_timed_steps(rt, ex, 32, 4e-3)  # idle every 8 steps: several save attempts
        rt.close()
    assert caplog.text.count("could not save calibration") == 1
    assert rt.cal.num_observations == 32 and rt.cal.median_error() < 0.05


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
