"""End-to-end: live calibration in a real vLLM engine (CPU, PP=2, tiny random Llama).

With ``live_calibration: true`` the engine runs no profiling pass: it serves vLLM's static
chunks with every step timed on both stages, fits the latency model once the timings cover
enough (chunk, history) points, logs the switch and sizes later prompts dynamically; greedy
tokens stay those of vLLM's own chunking throughout. (What dcpp does by itself on a model
runner that cannot time a prefill after a history, e.g. vLLM's V2 runner on CUDA.)
"""

from __future__ import annotations

import logging
import os

import pytest

from vllm_testlib import BUDGET, MIN_CHUNK, make_engine, prompt, vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

PROMPT_LEN = 3000
# Static chunks of these leave remainders 40, 100, 200, 300, 450, 70, 70, 70 tokens: small
# chunks and many histories, what the live fit's readiness rule asks for (52 prefill steps).
TRAFFIC = [2600, 1636, 3272, 1324, 5570, 2118, 4166, 3142]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    eng = make_engine(
        tiny_checkpoint,
        enable_prefix_caching=False,  # the same prompt is computed anew each time
        additional_config={"profiling_chunk_config": {
            "enabled": True, "min_chunk": MIN_CHUNK, "live_calibration": True,
            # Its own cache: a profile left by another test's engine would be loaded.
            "profile_cache_dir": str(tmp_path_factory.mktemp("live_profiles")),
        }},
    )
    yield eng
    killed = eng.shutdown()
    assert not killed, f"engine processes had to be killed at shutdown: {killed}"


def generate(eng, tokens, plan=None, max_tokens=8):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True, extra_args={"dcpp_plan": plan} if plan else None)
    out = eng.llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.request_id


def chunks(rt, request_id):
    hits = [v for k, v in rt.chunk_log.items()
            if k == request_id or k.rsplit("-", 1)[0] == request_id]
    assert len(hits) == 1, request_id
    return hits[0]


def test_starts_static_switches_to_dynamic_same_tokens(engine, caplog):
    from dcpp.tooling.harness import static_chunks

    rt = engine.scheduler.dcpp
    assert rt is not None and rt.model is None and rt.live is not None
    assert rt.profile.passes == 0 and rt.profile.source == "none"
    assert rt.stage_timing, "per-stage step timing should be on"
    p = prompt(PROMPT_LEN, seed=1)
    static = static_chunks(PROMPT_LEN, BUDGET)

    before, rid = generate(engine, p)  # dcpp's default plan, but nothing fitted yet
    assert chunks(rt, rid) == static
    off, rid = generate(engine, p, plan="off")
    assert chunks(rt, rid) == static and off == before

    caplog.set_level(logging.INFO, logger="vllm.dcpp")
    served = 0
    for round_ in range(3):
        for i, n in enumerate(TRAFFIC):
            if rt.live is None:
                break
            _, rid = generate(engine, prompt(n, seed=100 + 10 * round_ + i), max_tokens=1)
            served += 1
            if rt.live is not None:  # vLLM's chunks until the switch (which may come mid-prompt)
                assert chunks(rt, rid) == static_chunks(n, BUDGET)
    assert rt.live is None, f"not dynamic after {served} prompts: {rt.live.missing()}"
    switch = [m for m in caplog.messages if "dynamic chunking on" in m]
    assert len(switch) == 1 and "live calibration: fitted" in switch[0], caplog.messages
    print(f"after {served} prompts:", switch[0])
    assert rt.model is not None and rt.profile.source == "live"
    assert os.path.exists(rt.profile.path)  # the next start loads it: dynamic at once

    # dcpp plans every prompt now. The default (pipeline) plan may keep the budget where the
    # fitted per-step cost says more chunks cost more than they save on this tiny model; the
    # equal-time plan is dcpp's (not the budget) and never grows with the history (how much it
    # shrinks depends on the fit's history terms, which a noisy CPU fit may set to 0).
    after, rid = generate(engine, p)
    dynamic = chunks(rt, rid)
    [(start, planned)] = [v for k, v in rt.plan_log.items() if k.rsplit("-", 1)[0] == rid][0]
    assert start == 0 and planned == dynamic and sum(dynamic) == PROMPT_LEN
    equal, rid = generate(engine, p, plan="equal_time")
    eq = chunks(rt, rid)
    print("static", static, "pipeline plan", dynamic, "equal-time plan", eq)
    assert sum(eq) == PROMPT_LEN and eq != static
    assert all(x >= y for x, y in zip(eq[:-1], eq[1:-1])), eq
    assert after == equal == before == off
    off_again, _ = generate(engine, p, plan="off")
    assert off_again == off
