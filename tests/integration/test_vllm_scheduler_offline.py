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
    prompts beside dcpp's share of the step for a long one start no later than with vLLM
    (with the shares they fit beside it, so dcpp's run may need no refusal at all)."""
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
    assert any(c[2] == 0 < c[1] and c[4] for c in theirs.calls)  # vLLM's rule acted
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
    """While the other prompt's pending work covers a prompt's drain, it takes its share of the
    step without a plan; "b", not started (its prefix hit unknown) and needing more than the
    level, takes no share from "a": vLLM's chunks (vLLM runs "a" first, "b" waits). Only "b",
    left alone at the end, is planned, once, and its chunks are dcpp's, not vLLM's."""
    theirs, ours, ex = pair(model_dir, tmp_path, monkeypatch)
    specs = [("a", 20_000, 0), ("b", 12_000, 0)]
    add(theirs, specs)
    add(ours, specs)
    a, b = run(theirs), run(ours, ex)
    a_end = max(i for i, s in enumerate(b) if s.get("a", 0) > 1)
    assert all(a[i] == b[i] for i in range(a_end + 1))  # vLLM's steps exactly, "a" done
    assert ours.dcpp.sizer.num_shared >= a_end + 1
    assert ours.dcpp.sizer.num_plans == 1 and "a" not in ours.dcpp.plan_log
    [(start, log)] = ours.dcpp.plan_log["b"]
    ran = [s["b"] for s in b if s.get("b", 0) > 1]
    assert sum(log) == 12_000 - start and ran[-len(log):] == log
    assert min(log) < BUDGET and ran != [x["b"] for x in a if x.get("b", 0) > 1]


# --------------------------------------------------------------------------- the step's budget
# What the mixin keeps in step with vLLM: dcpp's step budget (`ChunkSizer._step`) counts what
# vLLM's hook really returned (`commit`, also after the lookahead retry), loses a request vLLM
# preempts within the step (`uncommit`), and every request vLLM frees loses its record.
# Fixed chunk sizes (`dcpp_chunk_size`, dcpp's number through the same hook) make each step's
# tokens and KV blocks known in advance: block_size 16, 141 blocks (one is vLLM's null block).
SMALL_CACHE = 141


def dcpp_only(model_dir, tmp_path, monkeypatch, policy="fcfs", cls=None, **kw):
    """dcpp's scheduler alone (no vLLM twin), its executor and a `StepBudget` on it."""
    from dcpp.integration.vllm.scheduler import DcppScheduler
    from dcpp.tooling import offline

    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    ex = offline.SyntheticExecutor()
    ours = offline.build_scheduler(cls or DcppScheduler, model_dir, executor=ex, budget=BUDGET,
                                   max_model_len=MAX_LEN, policy=policy,
                                   dcpp={"enabled": True, "min_chunk": 256}, **kw)
    assert ours.dcpp is not None and ours.dcpp.model is not None
    return ours, ex, StepBudget(ours.dcpp)


class StepBudget:
    """dcpp's step budget watched from inside vLLM's `schedule`: this step's commits and
    uncommits as they happen, and each step's grants as `DcppRuntime.end_step` finds them
    (read before it clears the step)."""

    def __init__(self, rt):
        sizer = rt.sizer
        commit, uncommit, end_step = sizer.commit, sizer.uncommit, rt.end_step
        self.events = []
        """This step's ("commit", id, tokens) and ("uncommit", id, tokens it had or None)."""
        self.ends = []
        """Per step: ({id: granted tokens}, the step's room, prefill room left)."""
        self.stale = []
        """Per checked step: {id: tokens} granted to a request left waiting (`step_checked`)."""

        def _commit(rid, history, tokens):
            self.events.append(("commit", rid, tokens))
            commit(rid, history, tokens)

        def _uncommit(rid):
            grant = sizer._step.granted.get(rid) if sizer._step is not None else None
            self.events.append(("uncommit", rid, grant.tokens if grant else None))
            uncommit(rid)

        def _end_step(step):
            st = sizer._step
            self.ends.append(({r: g.tokens for r, g in st.granted.items()}, st.room,
                              st.prefill_room))
            end_step(step)

        sizer.commit, sizer.uncommit, rt.end_step = _commit, _uncommit, _end_step


def scheduled_prefills(sched, out):
    """{request id: tokens} of the prefill chunks in vLLM's SchedulerOutput (a decode computes
    only a request's last token; vLLM has advanced num_computed_tokens already)."""
    chunks = {}
    for rid, n in out.num_scheduled_tokens.items():
        req = sched.requests[rid]
        if req.num_computed_tokens - n < req.num_tokens - 1:
            chunks[rid] = n
    return chunks


def step_checked(sched, ex, budget):
    """One step; dcpp's budget at its end holds exactly vLLM's scheduled prefills, but for
    one case: in vLLM's waiting loop a request whose KV blocks cannot be allocated after the
    hook answered stays waiting and ends the loop (0.32 and 0.33: `break`), so nothing tells
    dcpp and its grant stays. Then it is the step's last commit (no request is sized against
    it) and is recorded in `budget.stale`. Returns (the output, its prefills, this step's
    commit/uncommit events) before the model's output is handed back."""
    from vllm.v1.request import RequestStatus

    budget.events.clear()
    out = sched.schedule()
    ex.run(sched, out)
    granted, room, left = budget.ends[-1]
    prefills = scheduled_prefills(sched, out)
    stale = {r: t for r, t in granted.items() if r not in prefills}
    if stale:  # more than one, or one sized against: a grant vLLM took back was kept
        why = ("dcpp's step budget kept grants vLLM did not schedule", stale, budget.events)
        assert len(stale) == 1, why
        [(rid, tokens)] = stale.items()
        assert budget.events[-1] == ("commit", rid, tokens), why
        assert sched.requests[rid].status in (RequestStatus.WAITING,
                                              RequestStatus.PREEMPTED), why
    budget.stale.append(stale)
    assert {r: t for r, t in granted.items() if r in prefills} == prefills, (
        budget.events, dict(out.num_scheduled_tokens))
    assert left == room - sum(granted.values())
    return out, prefills, list(budget.events)


def answer(sched, out):
    from dcpp.tooling import offline

    sched.update_from_output(out, offline.fake_output(sched, out))


def fixed_request(rid, n, chunk, priority=0, t=0.0):
    from dcpp.tooling import offline

    return offline.make_request(n, priority=priority, request_id=rid, arrival_time=t,
                                max_tokens=1, chunk_size=chunk)


def test_a_request_preempted_after_its_grant_leaves_the_steps_budget(model_dir, tmp_path,
                                                                    monkeypatch):
    """PRIORITY: a low-priority prefill ("low") is scheduled first in a step; the
    higher-priority running prefill after it ("high") finds no KV blocks, so vLLM preempts
    "low", already granted this step, and gives its tokens back to its own budget. dcpp's
    step budget gives them back too: at the step's end it holds "high"'s chunk only. "low"
    keeps its record; resumed from token 0, its chunk log continues."""
    ours, ex, budget = dcpp_only(model_dir, tmp_path, monkeypatch, policy="priority",
                                 num_blocks=SMALL_CACHE)
    ours.add_request(fixed_request("low", 2048, 512, priority=1, t=0.0))
    out, prefills, _ = step_checked(ours, ex, budget)  # "low" alone: 32 blocks
    assert prefills == {"low": 512}
    answer(ours, out)
    ours.add_request(fixed_request("high", 1024, 512, priority=0, t=1.0))
    out, prefills, _ = step_checked(ours, ex, budget)  # running "low", then admits "high"
    assert prefills == {"low": 512, "high": 512}  # 96 of 140 blocks
    answer(ours, out)
    assert [r.request_id for r in ours.running] == ["low", "high"]
    record = ours.dcpp.requests.get("low")
    assert record is not None and record.chunks == [512, 512]

    # "low" takes 32 more blocks (128 used), "high" then needs 32 of the 12 left: vLLM
    # preempts "low" (priority 1) after it was granted, then allocates "high".
    out, prefills, events = step_checked(ours, ex, budget)
    assert events == [("commit", "low", 512), ("commit", "high", 512),
                      ("uncommit", "low", 512)]
    assert prefills == dict(out.num_scheduled_tokens) == {"high": 512}
    assert out.preempted_req_ids == {"low"}
    assert budget.ends[-1][2] == budget.ends[-1][1] - 512  # only "high"'s tokens left the room
    assert ours.dcpp.requests.get("low") is record  # preempted: the record stays
    answer(ours, out)

    while ours.has_unfinished_requests():
        out, _, events = step_checked(ours, ex, budget)
        assert not any(e[0] == "uncommit" for e in events)
        answer(ours, out)
        assert len(budget.ends) < 30
    assert ours.dcpp.chunk_log["low"] == [512, 512] + [512] * 4  # its log went on at 0
    assert ours.dcpp.chunk_log["high"] == [512, 512]
    assert len(ours.dcpp.requests) == 0  # both finished: both records freed
    assert not any(budget.stale)


def test_a_request_that_preempts_itself_leaves_the_steps_budget(model_dir, tmp_path,
                                                               monkeypatch):
    """FCFS: the last running prefill ("b") is granted, then finds no KV blocks; vLLM
    preempts the last running request, "b" itself (`preempted_req == request`), and does not
    schedule it. dcpp's step budget drops "b"'s grant; "b" keeps its record."""
    ours, ex, budget = dcpp_only(model_dir, tmp_path, monkeypatch, num_blocks=SMALL_CACHE)
    ours.add_request(fixed_request("a", 1600, 512, t=0.0))
    ours.add_request(fixed_request("b", 1024, 256, t=1.0))
    steps = []
    while ours.has_unfinished_requests():
        out, prefills, events = step_checked(ours, ex, budget)
        steps.append((prefills, events, set(out.preempted_req_ids or ())))
        answer(ours, out)
        assert len(steps) < 30
    # Blocks: 48 after step 0, 96 after step 1; in step 2 "a" takes 32 more (12 of 140 left)
    # and "b", the last running request, cannot get its 16.
    assert steps[0][0] == steps[1][0] == {"a": 512, "b": 256}
    prefills, events, preempted = steps[2]
    assert events == [("commit", "a", 512), ("commit", "b", 256), ("uncommit", "b", 256)]
    assert prefills == {"a": 512} and preempted == {"b"}
    assert all(not s[2] for i, s in enumerate(steps) if i != 2)  # the one preemption
    assert ours.dcpp.chunk_log["a"] == [512, 512, 512, 64]
    assert ours.dcpp.chunk_log["b"] == [256, 256] + [256] * 4  # the same log, from 0 again
    # Step 3: "b", waiting, is sized, then vLLM finds no room for its whole prompt
    # (`scheduler_reserve_full_isl`) and ends its waiting loop; "b"'s grant is the step's last.
    assert [i for i, st in enumerate(budget.stale) if st] == [3]
    assert budget.stale[3] == {"b": 256}
    assert len(ours.dcpp.requests) == 0


def under_dcpp_recording_vllms_hook():
    """dcpp's scheduler over a vLLM `Scheduler` that records each call of its own hook (the
    calls dcpp's mixin makes): (request id, tokens asked, vLLM's answer)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from dcpp.integration.vllm.scheduler import DcppScheduler

    class RecordingVllm(Scheduler):
        def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
            got = super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                     num_new_tokens)
            self.hook_calls.append((request.request_id, num_new_tokens, got))
            return got

    class Ours(DcppScheduler, RecordingVllm):  # MRO: dcpp's mixin, RecordingVllm, Scheduler
        hook_calls: list

    return Ours


def test_a_cut_in_the_lookahead_window_takes_vllms_number(model_dir, tmp_path, monkeypatch):
    """Multi-module MTP's lookahead (48 tokens, set on the built scheduler as above): a chunk
    may not end within 48 tokens of the prompt's end. "short" (40 tokens, fixed chunks of 16)
    would end 24 before it: vLLM answers 0 for dcpp's 16, and the mixin takes vLLM's own
    number, the whole prompt (without the retry "short" would never run). "long" (1000,
    chunks of 480) would end its second chunk 40 before the end: vLLM trims it to 472, and
    the step's budget counts 472, what vLLM took, not dcpp's 480."""
    ours, ex, budget = dcpp_only(model_dir, tmp_path, monkeypatch,
                                 cls=under_dcpp_recording_vllms_hook())
    if not hasattr(ours, "num_prefill_lookahead"):
        from dcpp.integration.vllm.vllm_compat import vllm_version

        pytest.skip(f"vLLM {vllm_version()}'s Scheduler has no num_prefill_lookahead")
    ours.num_prefill_lookahead = LOOKAHEAD
    ours.hook_calls = []
    ours.add_request(fixed_request("long", 1000, 480, t=0.0))
    ours.add_request(fixed_request("short", 40, 16, t=1.0))
    steps = []
    while ours.has_unfinished_requests():
        ours.hook_calls.clear()
        out, prefills, events = step_checked(ours, ex, budget)
        steps.append((prefills, events, list(ours.hook_calls)))
        answer(ours, out)
        assert len(steps) < 10
    assert [s[0] for s in steps] == [{"long": 480, "short": 40}, {"long": 472}, {"long": 48}]
    # Step 0: "short" asked with dcpp's 16 (refused), then with vLLM's 40; 40 committed.
    assert steps[0][2] == [("long", 480, 480), ("short", 16, 0), ("short", 40, 40)]
    assert steps[0][1] == [("commit", "long", 480), ("commit", "short", 40)]
    # Step 1: dcpp's 480 trimmed by vLLM, no retry (vLLM's answer is not 0); 472 committed.
    assert steps[1][2] == [("long", 480, 472)]
    assert steps[1][1] == [("commit", "long", 472)]
    assert ours.dcpp.chunk_log["long"] == [480, 472, 48]
    assert ours.dcpp.chunk_log["short"] == [40]
    assert not any(budget.stale)
    assert len(ours.dcpp.requests) == 0


def test_records_go_when_requests_finish_or_are_aborted(model_dir, tmp_path, monkeypatch):
    """Every request vLLM frees loses its dcpp record: one that finished, one aborted mid
    prefill (running), one aborted while waiting after a preemption (a preempted request
    keeps its record until then)."""
    from vllm.v1.request import RequestStatus

    ours, ex, budget = dcpp_only(model_dir, tmp_path, monkeypatch, num_blocks=SMALL_CACHE)
    rt = ours.dcpp
    ours.add_request(fixed_request("done", 100, 64, t=0.0))
    ours.add_request(fixed_request("a", 2100, 512, t=1.0))
    ours.add_request(fixed_request("b", 1024, 256, t=2.0))
    out, prefills, _ = step_checked(ours, ex, budget)
    assert prefills == {"done": 64, "a": 512, "b": 256}
    answer(ours, out)
    out, prefills, _ = step_checked(ours, ex, budget)
    assert prefills == {"done": 36, "a": 512, "b": 256}
    answer(ours, out)  # "done" sampled its one token: finished, freed
    assert "done" not in ours.requests and "done" not in rt.requests
    assert rt.chunk_log["done"] == [64, 36]  # the log outlives the record
    out, prefills, _ = step_checked(ours, ex, budget)  # "b" preempts itself (as above)
    assert prefills == {"a": 512} and out.preempted_req_ids == {"b"}
    answer(ours, out)
    assert {r.request_id for r in rt.requests} == {"a", "b"}  # "b" waits, its record kept
    ours.finish_requests("b", RequestStatus.FINISHED_ABORTED)  # aborted while waiting
    assert {r.request_id for r in rt.requests} == {"a"}
    out, prefills, _ = step_checked(ours, ex, budget)
    assert prefills == {"a": 512}
    answer(ours, out)
    assert ours.requests["a"].num_computed_tokens == 2048 < 2100  # still prefilling
    ours.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # aborted mid prefill
    assert not ours.has_unfinished_requests()
    assert len(rt.requests) == 0
    assert not any(budget.stale)


def test_a_low_priority_request_that_preempts_itself_leaves_the_steps_budget(
        model_dir, tmp_path, monkeypatch):
    """PRIORITY, the victim is the request being scheduled: "low" (first in the running
    queue) is granted, finds no KV blocks and is itself the lowest-priority running request,
    so vLLM preempts it. vLLM 0.33 then goes on to "high" after it (`continue`), which dcpp
    sizes with "low"'s grant already gone; 0.32 stops the step there (`break`)."""
    ours, ex, budget = dcpp_only(model_dir, tmp_path, monkeypatch, policy="priority",
                                 num_blocks=101)  # 100 usable blocks
    ours.add_request(fixed_request("low", 1536, 512, priority=1, t=0.0))
    out, prefills, _ = step_checked(ours, ex, budget)
    answer(ours, out)
    # "high"'s whole prompt (33 blocks) fits beside "low"'s 64 when it is admitted...
    ours.add_request(fixed_request("high", 520, 512, priority=0, t=1.0))
    steps = [(prefills, [])]
    while ours.has_unfinished_requests():
        out, prefills, events = step_checked(ours, ex, budget)
        steps.append((prefills, events))
        answer(ours, out)
        assert len(steps) < 30
    assert steps[1] == ({"low": 512, "high": 512},
                        [("commit", "low", 512), ("commit", "high", 512)])
    # ...and then "low"'s next 32 blocks do not (4 left): "low" preempts itself.
    if defers_refused_waiting():  # vLLM 0.33: "high" is scheduled after it in the same step
        assert steps[2] == ({"high": 8}, [("commit", "low", 512), ("uncommit", "low", 512),
                                          ("commit", "high", 8)])
    else:  # vLLM 0.32: the running loop ends; "high" runs in the next step
        assert steps[2] == ({}, [("commit", "low", 512), ("uncommit", "low", 512)])
        assert steps[3][0] == {"high": 8}
    assert ours.dcpp.chunk_log["low"] == [512, 512] + [512] * 3
    assert ours.dcpp.chunk_log["high"] == [512, 8]
    # 0.32, step 3: "low", waiting, is sized beside "high" and finds no room for its whole
    # prompt (`scheduler_reserve_full_isl`): the waiting loop ends on its grant.
    stale = {i: st for i, st in enumerate(budget.stale) if st}
    assert stale == ({} if defers_refused_waiting() else {3: {"low": 512}})
    assert len(ours.dcpp.requests) == 0
