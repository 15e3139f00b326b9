"""dcpp's scheduler against vLLM's own, side by side, with no model (as vLLM's scheduler tests
do): the same request stream, fake model outputs, synthetic per-stage timings. dcpp may change
chunk sizes only: the steps a burst takes and the order requests start in (FCFS and priority)
match vLLM's; no request starts later than with vLLM. Runs against vLLM 0.32 (the CPU build) and
0.33 (its pure-Python scheduler, `make test-vllm033`), whose deferred-waiting queue lets later
requests overtake one the per-request hook refuses."""

from __future__ import annotations

import pytest

from vllm_testlib import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

BUDGET = 2048
MAX_LEN = 65536


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dcpp.tooling.harness import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("offline_llama"), layers=2, hidden=64,
                      max_len=MAX_LEN)


def pair(model_dir, tmp_path, monkeypatch, policy="fcfs", min_chunk=256, wrap=None,
         asynchronous=False, **kw):
    # A fresh profile cache per test: min_chunk is part of the profile's key.
    """(vLLM's scheduler, dcpp's scheduler, dcpp's synthetic executor); `wrap(cls)` makes
    the class each is built from; `asynchronous`: vLLM's AsyncScheduler and dcpp's variant
    of it (GPU executors with async scheduling) instead of the sync ones."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from dcpp.tooling import offline
    from dcpp.integration.vllm.scheduler import DcppAsyncScheduler, DcppScheduler

    if asynchronous:
        Scheduler, DcppScheduler = AsyncScheduler, DcppAsyncScheduler  # noqa: N806
    wrap = wrap or (lambda cls: cls)
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    ex = offline.SyntheticExecutor()
    common = dict(budget=BUDGET, max_model_len=MAX_LEN, policy=policy, **kw)
    ours = offline.build_scheduler(wrap(DcppScheduler), model_dir, executor=ex,
                                   dcpp={"enabled": True, "min_chunk": min_chunk}, **common)
    assert ours.dcpp is not None and ours.dcpp.model is not None  # really sizing chunks
    theirs = offline.build_scheduler(wrap(Scheduler), model_dir, **common)
    return theirs, ours, ex


def add(sched, specs):
    """specs: [(request id, prompt length, priority)]: the same ids and prompts for both."""
    from dcpp.tooling import offline

    for i, (rid, n, prio) in enumerate(specs):
        sched.add_request(offline.make_request(n, seed=i, priority=prio, request_id=rid,
                                               arrival_time=float(i), max_tokens=1))


def run(sched, ex=None, max_steps=2000):
    """Steps until every request is done: [{request id: tokens scheduled}] per step."""
    from dcpp.tooling import offline

    steps = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        if ex is not None:
            ex.run(sched, out)
        steps.append(dict(out.num_scheduled_tokens))
        sched.update_from_output(out, offline.fake_output(sched, out))
        assert len(steps) < max_steps
    return steps


def order(steps):
    """Request ids in the order they were first scheduled (ties: the step's order)."""
    seen = first_steps(steps)
    return sorted(seen, key=seen.get)


def first_steps(steps):
    """Request id -> the step it was first scheduled in."""
    seen = {}
    for i, step in enumerate(steps):
        for rid in step:
            seen.setdefault(rid, i)
    return seen


@pytest.mark.parametrize("n,length,min_chunk", [(10, 10, 256), (6, 300, 4096)])
def test_a_burst_takes_as_many_steps_as_with_vllm(model_dir, tmp_path, monkeypatch, n, length,
                                                  min_chunk):
    """Requests up to min_chunk (vllm-ascend's default 4096, clamped to the budget) are never
    split, so a burst of them runs in vLLM's steps."""
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch, min_chunk=min_chunk)
    specs = [(f"r{i}", length, 0) for i in range(n)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    assert len(a) == len(b)
    assert a[0] == b[0] == {f"r{i}": length for i in range(n)}  # all in the first step


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_short_requests_beside_a_long_prefill_start_when_vllms_do(model_dir, tmp_path,
                                                                 monkeypatch, asynchronous):
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch, asynchronous=asynchronous)
    specs = [("long", 30_000, 0)] + [(f"s{i}", 200 + 50 * i, 0) for i in range(6)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    # Same start order; dcpp's smaller chunks of the long prompt leave vLLM budget for the
    # short ones, which therefore start no later than with vLLM's chunking (here earlier).
    assert order(a) == order(b)
    fa, fb = first_steps(a), first_steps(b)
    assert all(fb[r] <= fa[r] for r in fa) and any(fb[r] < fa[r] for r in fa)
    # dcpp really sized the long prompt's chunks (not vLLM's budget-sized ones).
    long_ours = [s["long"] for s in b if "long" in s]
    assert sum(long_ours) == 30_000 and len(set(long_ours)) > 3
    # The short prompts ran beside the long prefill.
    assert all("long" in b[fb[f"s{i}"]] for i in range(6))


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_start_order_is_vllms(model_dir, tmp_path, monkeypatch, policy, asynchronous):
    """More long prompts than one step holds: they start in vLLM's order (arrival, or
    priority), in the same steps."""
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch, policy=policy, max_num_seqs=3,
                            asynchronous=asynchronous)
    specs = [(f"p{i}", 3000 + 500 * i, (5 - i) % 3) for i in range(6)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    assert order(a) == order(b)


# Multi-module MTP's rule in vLLM's per-request hook (`num_prefill_lookahead`): a chunk may not
# end within that many tokens of the prompt's end, so a short prompt offered less than all of
# it is refused (0). vLLM 0.32 then stops admitting waiting requests; 0.33 defers the refused
# one (`deferred_waiting`) and admits the ones behind it. Set here without a drafter.
LOOKAHEAD = 48


def defers_refused_waiting():
    """vLLM 0.33 and later requeue a refused waiting request; 0.32 stops the waiting loop."""
    from packaging.version import Version

    from dcpp.integration.vllm.vllm_compat import vllm_version

    return Version(vllm_version()).release[:2] >= (0, 33)


def lookahead_recording(cls):
    """`cls` with multi-module MTP's lookahead, recording every hook call beside vLLM's own
    rule at that state: (request id, tokens offered, answer, vLLM's answer, waiting?)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_prefill_lookahead = LOOKAHEAD
            self.calls = []
            self.deferred = set()  # ids ever in 0.33's deferred_waiting

        def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
            got = super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                     num_new_tokens)
            own = Scheduler._reserve_prefill_lookahead(self, request, num_computed_tokens,
                                                       num_new_tokens)
            waiting = request not in self.running
            self.calls.append((request.request_id, num_new_tokens, got, own, waiting))
            return got

        def schedule(self, *args, **kwargs):
            out = super().schedule(*args, **kwargs)
            self.deferred |= {r.request_id for r in getattr(self, "deferred_waiting", ())}
            return out

    return Recording


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_request_is_refused_only_where_vllms_rule_refuses_it(model_dir, tmp_path,
                                                              monkeypatch, policy):
    """dcpp's chunk is never 0: its hook answers 0 exactly where vLLM's own rule does at the
    same state, so it defers (0.33) or stops admission (0.32) only where vLLM would. Short
    prompts beside dcpp's smaller chunks of a long one start no later than with vLLM."""
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch, policy=policy,
                            wrap=lookahead_recording)
    specs = [("long", 12_000, 0)] + [(f"s{i}", 30 + 7 * (i % 5), i % 3) for i in range(40)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    for call in ours.calls:
        _, offered, got, own, _ = call
        assert (got == 0) == (own == 0) and got <= own <= max(offered, 0), call
    refused = [c for c in ours.calls if c[2] == 0 < c[1] and c[4]]
    assert refused and any(c[2] == 0 < c[1] and c[4] for c in theirs.calls)  # the rule acted
    if defers_refused_waiting():  # vLLM 0.33: deferred, later requests went on
        assert {c[0] for c in refused} <= ours.deferred
    fa, fb = first_steps(a), first_steps(b)
    assert all(fb[r] <= fa[r] for r in fa) and any(fb[r] < fa[r] for r in fa)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_refused_requests_are_deferred_as_with_vllm(model_dir, tmp_path, monkeypatch, policy):
    """Prompts dcpp never splits (up to min_chunk): the same steps as vLLM's, refusals and
    vLLM 0.33's deferred-waiting order included (0.32 stops admission at the refusal)."""
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch, policy=policy, min_chunk=4096,
                            wrap=lookahead_recording)
    specs = [("a", 2040, 0), ("b", 40, 0), ("c", 5, 1), ("d", 1500, 0), ("e", 30, 2),
             ("f", 600, 0), ("g", 45, 1)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    assert a == b
    assert ("b", 8, 0, 0, True) in ours.calls  # "a" left 8 tokens: "b" (40) is refused
    first = first_steps(b)
    if defers_refused_waiting():  # 0.33: later requests overtake "b"
        assert ours.deferred == theirs.deferred == {"b"}
        assert first["d"] == 0 < first["b"]
    else:  # 0.32: nothing behind "b" starts in that step
        assert not ours.deferred and not theirs.deferred
        assert first["b"] == first["d"] == 1


def test_a_trimmed_chunk_is_not_replanned(model_dir, tmp_path, monkeypatch):
    """Two long equal-time prompts (planned even beside each other) share steps, so their
    planned chunks are cut every step; each is planned once."""
    from dcpp.tooling import offline

    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch)
    del theirs
    for i, (rid, n) in enumerate((("a", 20_000), ("b", 16_000))):
        ours.add_request(offline.make_request(n, seed=i, request_id=rid, arrival_time=float(i),
                                              max_tokens=1, plan="equal_time"))
    steps = run(ours, ex)
    assert any(len(s) == 2 and min(s.values()) > 1 for s in steps)  # shared prefill steps
    assert ours.dcpp.sizer.num_plans == 2
    cut = False
    for rid, n in (("a", 20_000), ("b", 16_000)):
        [(start, plan)] = ours.dcpp.plan_log[rid]  # one plan, made before its first chunk
        ran = [s[rid] for s in steps if rid in s and s[rid] > 1]  # vLLM's outputs
        assert start == 0 and sum(plan) == n == sum(ran)
        assert ours.dcpp.chunk_log[rid] == ran
        cut |= ran != plan
    assert cut  # at least one plan's chunks were cut by the shared steps, and not replanned


def test_a_scheduler_built_without_init_behaves_like_vllms():
    from dcpp.integration.vllm.scheduler import DcppScheduler

    sched = object.__new__(DcppScheduler)  # as vLLM's own scheduler tests do
    assert sched.dcpp is None


def test_a_fixed_chunk_size_request_takes_that_many_tokens(model_dir, tmp_path, monkeypatch,
                                                           caplog):
    """`dcpp_chunk_size` (the benchmark's fixed-chunk baseline inside one server): that many
    tokens every step, the last one shorter; a bad value is ignored with a warning naming it."""
    from dcpp.tooling import offline

    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch)
    del theirs
    ours.add_request(offline.make_request(5000, max_tokens=1, request_id="fixed",
                                          chunk_size=768))
    ours.add_request(offline.make_request(3000, max_tokens=1, request_id="bad",
                                          chunk_size=0, arrival_time=1.0))
    with caplog.at_level("WARNING"):
        steps = run(ours, ex)
    assert [s["fixed"] for s in steps if "fixed" in s] == [768] * 6 + [392]
    assert "dcpp_chunk_size=0 on request bad is not an int >= 1" in caplog.text
    assert caplog.text.count("dcpp_chunk_size=0") == 1  # once per request, not per step
    assert sum(s["bad"] for s in steps if "bad" in s) == 3000


def test_two_long_prompts_take_vllms_chunks_until_one_would_drain_the_pipeline(
        model_dir, tmp_path, monkeypatch):
    """While the other prompt's pending work covers a prompt's drain, dcpp stands aside:
    vLLM's chunks, no plan (vLLM runs "a" first, "b" waits). Only "b", left alone at the end,
    is planned, once, and its chunks are dcpp's, not vLLM's budget-sized ones."""
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch)
    specs = [("a", 20_000, 0), ("b", 12_000, 0)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    a_end = max(i for i, s in enumerate(b) if s.get("a", 0) > 1)
    assert all(a[i] == b[i] for i in range(a_end + 1))  # vLLM's steps exactly, "a" done
    assert ours.dcpp.sizer.num_stood_aside >= a_end + 1
    assert ours.dcpp.sizer.num_plans == 1 and "a" not in ours.dcpp.plan_log
    [(start, log)] = ours.dcpp.plan_log["b"]
    ran = [s["b"] for s in b if s.get("b", 0) > 1]
    assert sum(log) == 12_000 - start and ran[-len(log):] == log
    assert min(log) < BUDGET and ran != [x["b"] for x in a if x.get("b", 0) > 1]
