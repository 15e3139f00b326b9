"""End-to-end: dcpp's scheduler inside a real vLLM engine (CPU, PP=2, tiny random Llama).

One engine for the whole module (start-up costs 45-90 s on CPU). Requests pick their plan with
`SamplingParams(extra_args={"dcpp_plan": ...})`; "off" is vLLM's own static chunking, so static
and dynamic runs are compared inside the same engine.
"""

from __future__ import annotations

import math

import pytest

import vllm_testlib as lib
from vllm_testlib import BUDGET, MAX_MODEL_LEN, MIN_CHUNK, make_engine, prompt, vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

PROMPT_LEN = 3000
KV_BLOCKS = MAX_MODEL_LEN // 128 + 8  # vLLM's CPU block size is 128 tokens


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, profile_cache_dir):
    eng = make_engine(
        tiny_checkpoint,
        enable_prefix_caching=True,
        # A KV cache a little above one max_model_len request, so that two long prompts at once
        # must preempt one of them (test_preemption_...).
        num_gpu_blocks_override=KV_BLOCKS,
        additional_config={"profiling_chunk_config": {
            "enabled": True, "min_chunk": MIN_CHUNK, "num_profile_samples": 16,
        }},
    )
    yield eng
    killed = eng.shutdown()
    assert not killed, f"engine processes had to be killed at shutdown: {killed}"


def internal_ids(log, request_id):
    """Keys of `log` for the user's `request_id`: vLLM 0.32 appends a random suffix to it inside
    the engine."""
    return [k for k in log if k == request_id or k.rsplit("-", 1)[0] == request_id]


def entry(log, request_id):
    """The one value `log` holds for the user's `request_id`."""
    hits = internal_ids(log, request_id)
    assert len(hits) == 1, (request_id, list(log)[-5:])
    return log[hits[0]]


def generate(eng, prompts, plan=None, max_tokens=8, fresh=True, **kw):
    """Greedy generation; `fresh` empties the prefix cache first so the prompt is computed."""
    from vllm import SamplingParams

    if fresh:
        assert eng.llm.reset_prefix_cache()
    extra = {"dcpp_plan": plan} if plan else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            extra_args=extra, **kw)
    outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outs


def test_plugin_switched_scheduler_and_profiled(engine):
    from dcpp.integration.vllm.scheduler import DcppScheduler

    sched = engine.scheduler
    assert isinstance(sched, DcppScheduler)
    rt = sched.dcpp
    assert rt is not None and rt.model is not None, "profiling fell back to static chunking"
    assert rt.profile.source == "profiled"
    assert rt.profile.passes > 0
    # The profile landed in the cache for the next start-up.
    import os

    assert rt.profile.path and os.path.exists(rt.profile.path)


def test_greedy_identical_static_vs_dynamic_and_chunk_plan(engine):
    rt = engine.scheduler.dcpp
    p = prompt(PROMPT_LEN, seed=1)
    static = generate(engine, [p], plan="off")[0]
    refits = rt.cal.num_refits
    dynamic = generate(engine, [p])[0]
    assert list(dynamic.outputs[0].token_ids) == list(static.outputs[0].token_ids)

    static_chunks = entry(rt.chunk_log, static.request_id)
    assert static_chunks[:-1] == [BUDGET] * (len(static_chunks) - 1)
    chunks = entry(rt.chunk_log, dynamic.request_id)
    print("dynamic chunks", chunks, "static", static_chunks)
    assert sum(chunks) == PROMPT_LEN
    # The executed sequence is the plan the chunker made at admission...
    [(start, planned)] = entry(rt.plan_log, dynamic.request_id)  # one plan, as made
    assert start == 0 and chunks == planned
    if rt.cal.num_refits == refits:  # ...which is the chunker's plan for this prompt
        assert chunks == rt.predictors[rt.cfg.plan_mode].plan(PROMPT_LEN, history=0)
    # The default (pipeline-aware) plan is never worse than equal-time under the model; the
    # equal-time plan's chunks shrink as history grows (the last one is the remainder).
    from dcpp.chunker.planner import plan_cost

    eq = generate(engine, [p], plan="equal_time")[0]
    assert list(eq.outputs[0].token_ids) == list(static.outputs[0].token_ids)
    eq_chunks = entry(rt.chunk_log, eq.request_id)
    assert entry(rt.plan_log, eq.request_id) == [(0, eq_chunks)]
    assert sum(eq_chunks) == PROMPT_LEN
    body = eq_chunks[:-1]
    assert all(a >= b for a, b in zip(body, body[1:])), eq_chunks
    assert body[0] > body[-1], eq_chunks
    assert len(eq_chunks) > len(static_chunks) - 1
    now_default = rt.predictors["pipeline"].plan(PROMPT_LEN, history=0)
    now_equal = rt.predictors["equal_time"].plan(PROMPT_LEN, history=0)
    assert plan_cost(rt.model, now_default, 2) <= plan_cost(rt.model, now_equal, 2) * (1 + 1e-9)


def test_prompt_logprobs_match_reference(engine, tiny_checkpoint):
    import torch

    from dcpp.reference.checkpoint import load_checkpoint
    from dcpp.reference.model import forward

    n = 1500
    p = prompt(n, seed=2)
    out = generate(engine, [p], max_tokens=1, prompt_logprobs=0)[0]
    rt = engine.scheduler.dcpp
    assert len(entry(rt.chunk_log, out.request_id)) > 1  # really chunked
    config, params = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        logits = forward(params, config, torch.tensor(p))  # [T, vocab] fp32
    ref = torch.log_softmax(logits.double(), dim=-1)
    got = []
    want = []
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        got.append(lp[p[i]].logprob)
        want.append(ref[i - 1, p[i]].item())
    err = max(abs(a - b) for a, b in zip(got, want))
    assert err < 2e-3, f"max |logprob - reference| = {err}"


def test_prefix_cache_hit_starts_at_cached_history(engine):
    rt = engine.scheduler.dcpp
    base = prompt(2000, seed=3)
    first = generate(engine, [base])[0]
    extended = base + prompt(700, seed=4)
    second = generate(engine, [extended], fresh=False)[0]
    [(start, planned)] = entry(rt.plan_log, second.request_id)
    assert start >= 1024, f"expected a prefix-cache hit, plan started at {start}"
    assert sum(entry(rt.chunk_log, second.request_id)) == len(extended) - start
    reference = generate(engine, [extended], plan="off")[0]
    assert list(second.outputs[0].token_ids) == list(reference.outputs[0].token_ids)
    assert first.outputs[0].token_ids


def test_concurrent_long_prompts_and_short_requests_finish(engine):
    rt = engine.scheduler.dcpp
    longs = [prompt(2500, seed=5), prompt(2200, seed=6)]
    shorts = [prompt(20 + i, seed=10 + i) for i in range(4)]
    outs = generate(engine, longs + shorts, max_tokens=6, ignore_eos=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6] * 6
    for o, p in zip(outs, longs + shorts):
        assert o.outputs[0].finish_reason == "length"
        if len(p) > 1:
            assert sum(entry(rt.chunk_log, o.request_id)) == len(p)
    # Nothing left behind in dcpp's per-request state.
    assert not lib.live_plans(rt) and len(rt.requests) == 0


def test_calibration_observes_step_timings(engine):
    rt = engine.scheduler.dcpp
    assert rt.cfg.need_timing
    assert rt.cal.num_observations > 0
    assert math.isfinite(rt.cal.median_error())


def test_abort_mid_prefill_loses_nothing_and_leaves_nothing_behind(engine):
    from vllm import SamplingParams

    rt = engine.scheduler.dcpp
    assert engine.llm.reset_prefix_cache()
    eng = engine.llm.llm_engine

    def params(plan=None):
        return SamplingParams(max_tokens=4, temperature=0.0, detokenize=False, ignore_eos=True,
                              extra_args={"dcpp_plan": plan} if plan else None)

    kept = prompt(2600, seed=21)

    def computed(name):
        return sum(sum(rt.chunk_log[k]) for k in internal_ids(rt.chunk_log, name))

    def abort_part_way(name, tokens, plan=None):
        eng.add_request(name, {"prompt_token_ids": tokens}, params(plan))
        for _ in range(200):
            eng.step()
            # A plan may be put off to the request's second step (`ChunkSizer._plan_for`).
            if computed(name) >= min(2 * MIN_CHUNK, len(tokens) // 2) and (
                    plan is not None or internal_ids(lib.live_plans(rt), name)):
                break
        assert 0 < computed(name) < len(tokens), (name, computed(name))
        if plan is None:
            assert internal_ids(lib.live_plans(rt), name), f"{name} should have a live plan"
        eng.abort_request([name])

    # One doomed prompt under vLLM's own chunking ("off": no plan), one under dcpp's plan,
    # aborted part-way through their prefills while another long prompt runs.
    abort_part_way("abort-me-too", prompt(1500, seed=22), plan="off")
    eng.add_request("keep-me", {"prompt_token_ids": kept}, params())
    abort_part_way("abort-me", prompt(3000, seed=20))
    finished = {}
    for _ in range(500):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert not eng.has_unfinished_requests()
    assert list(finished) == ["keep-me"], list(finished)
    static = generate(engine, [kept], plan="off", max_tokens=4, ignore_eos=True)[0]
    assert list(finished["keep-me"].outputs[0].token_ids) == list(static.outputs[0].token_ids)
    # dcpp keeps no per-request state for the aborted requests (nor for the finished one).
    # Every record went with its request (vLLM's _free_request), the plans and timers with it.
    assert len(rt.requests) == 0
    assert not internal_ids(rt.prefills.timed(), "abort-me")
    assert not internal_ids(rt.prefills.timed(), "abort-me-too")
    assert len(rt.ledger) == 0


def test_preemption_replans_from_the_new_history_and_loses_nothing(engine, monkeypatch):
    sched = engine.scheduler
    rt = sched.dcpp
    cache = engine.llm.llm_engine.vllm_config.cache_config
    capacity = cache.num_gpu_blocks * cache.block_size
    # vLLM admits a prompt only when all its blocks are free: two prompts that each take just
    # under half of the cache both start, and their decodes run out of blocks. The survivor's
    # further decode evicts the victim's last cached blocks, so the victim must compute its
    # tail again, from a history > 0, under a new plan.
    half = (cache.num_gpu_blocks - 1) // 2
    n = half * cache.block_size - cache.block_size // 2
    decode = 3 * cache.block_size
    prompts = [prompt(n, seed=30), prompt(n, seed=31)]
    static = [generate(engine, [p], plan="off", max_tokens=decode, ignore_eos=True)[0]
              for p in prompts]

    preempted, plans = [], []
    preempt, plan_for = sched._preempt_request, rt.sizer._plan_for

    def counting_preempt(request, *args, **kwargs):
        preempted.append((request.request_id, int(request.num_computed_tokens)))
        return preempt(request, *args, **kwargs)

    def recording_plan(ask):
        made = rt.sizer.num_plans
        plan = plan_for(ask)
        if rt.sizer.num_plans > made:  # a new plan (not the continued one)
            request = sched.requests[ask.request_id]
            plans.append((ask.request_id, int(request.num_preemptions), ask.history,
                          ask.total, list(plan.chunks)))
        return plan

    monkeypatch.setattr(sched, "_preempt_request", counting_preempt)
    monkeypatch.setattr(rt.sizer, "_plan_for", recording_plan)
    # equal_time: planned at admission even beside the other prompt ("pipeline" would take
    # vLLM's chunks while the other prompt's work feeds the pipeline, and plan later).
    outs = generate(engine, prompts, plan="equal_time", max_tokens=decode, ignore_eos=True)
    assert preempted, f"two {n}-token prompts in a {capacity}-token KV cache were not preempted"
    for o, ref in zip(outs, static):
        assert list(o.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
    victim, computed = preempted[0]
    # Planned at admission from 0; after the preemption planned again from where vLLM resumed
    # it (0, or what the prefix cache still held), each plan covering exactly the tokens left.
    first = [p for p in plans if p[0] == victim and p[1] == 0]
    resumed = [p for p in plans if p[0] == victim and p[1] == 1]
    assert first and first[0][2] == 0, plans
    assert resumed, f"no plan after {victim} was preempted: {plans} {preempted} {rt.chunk_log[victim]}"
    _, _, at, resumed_total, chunks = resumed[0]
    print("preempted", preempted, "resumed at", at, "of", resumed_total, "plan", chunks)
    assert at <= computed, (at, computed)
    for _, _, h, total, planned in first + resumed:
        assert sum(planned) == total - h, (h, total, planned)
    # Its whole prompt ran before the preemption (vLLM admits a prompt whose blocks all fit),
    # then what the prefix cache had lost ran again.
    assert sum(rt.chunk_log[victim]) >= n + (resumed_total - at)
    assert not lib.live_plans(rt) and len(rt.requests) == 0
