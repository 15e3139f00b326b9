"""ChunkPredictor: static fallback, plan caching, re-planning, and its agreement with plan()."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dcpp.chunker.predictor as predictor_mod
from conftest import LLAMA8B_P4, PREFIX_HEAVY
from dcpp.chunker.predictor import ChunkPredictor
from dcpp.config import ProfilingChunkConfig

ON = ProfilingChunkConfig(enabled=True, min_chunk=2048)


def _make(cfg=ON, model=LLAMA8B_P4, **kw):
    args = dict(max_num_batched_tokens=16384, page_size=16, max_model_len=1 << 20, num_stages=4)
    args.update(kw)
    return ChunkPredictor(cfg, model, **args)


def _walk(pred, n, h0=0):
    out, h = [], h0
    while h < h0 + n:
        c = pred.next_chunk(h, h0 + n - h)
        out.append(c)
        h += c
    return out


def test_static_while_no_model_or_disabled():
    for pred in (_make(model=None), _make(cfg=ProfilingChunkConfig())):
        assert pred.is_static
        assert pred.next_chunk(0, 40000) == 16384
        assert pred.next_chunk(32768, 7232) == 7232
        assert pred.plan(40000) == [16384, 16384, 7232]


@pytest.mark.parametrize("mode", ["pipeline", "equal_time", "static"])
@pytest.mark.parametrize("model", [LLAMA8B_P4, PREFIX_HEAVY], ids=["llama", "prefix"])
def test_next_chunk_walk_equals_plan(mode, model):
    cfg = ProfilingChunkConfig(enabled=True, min_chunk=2048, plan_mode=mode)
    pred = _make(cfg, model)
    for n, h0 in ((100_000, 0), (70_001, 3000)):
        assert _walk(pred, n, h0) == pred.plan(n, h0)
        assert sum(pred.plan(n, h0)) == n


def test_pipeline_plans_are_cached(monkeypatch):
    pred = _make()
    calls = []
    real = predictor_mod.default_plan
    monkeypatch.setattr(predictor_mod, "default_plan",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    chunks = _walk(pred, 200_000)
    assert len(calls) == 1 and len(chunks) > 2
    # The scheduler ran fewer tokens than asked: re-plan from the actual history.
    pred.next_chunk(chunks[0] - 64, 200_000 - chunks[0] + 64)
    assert len(calls) == 2
    pred.set_model(PREFIX_HEAVY)  # a refit drops cached plans
    pred.next_chunk(0, 200_000)
    assert len(calls) == 3


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300_000), h0=st.integers(0, 20_000),
       sigma=st.sampled_from([0.0, 0.3, 1.0]), mode=st.sampled_from(["pipeline", "equal_time"]))
def test_walk_invariants(n, h0, sigma, mode):
    cfg = ProfilingChunkConfig(enabled=True, min_chunk=3000, smooth_factor=sigma, plan_mode=mode)
    pred = _make(cfg)
    chunks = _walk(pred, n, h0)
    assert sum(chunks) == n and all(0 < c <= 16384 for c in chunks)
    for c in chunks[:-1]:
        assert c % 64 == 0 and c >= 3000
    if sigma == 0:
        assert chunks == [16384] * (n // 16384) + ([n % 16384] if n % 16384 else [])


def test_clamps_and_bad_inputs():
    pred = _make(max_model_len=50_000)
    assert pred.next_chunk(0, 0) == 0
    c = pred.next_chunk(45_000, 20_000)  # only 5000 tokens of room left
    assert 0 < c <= 5000
    with pytest.raises(ValueError, match="no room"):
        pred.next_chunk(50_000, 10)
    with pytest.raises(ValueError, match="remaining=-1"):
        pred.next_chunk(0, -1)
    with pytest.raises(ValueError, match="ProfilingChunkConfig"):
        ChunkPredictor({"enabled": True}, None, max_num_batched_tokens=1, max_model_len=1,
                       num_stages=2)
    with pytest.raises(ValueError, match="HistoryLatencyModel"):
        pred.set_model("model")


def test_small_model_updates_keep_the_plan_large_ones_replace_it():
    """A refit that moves the optimum among plans of nearly equal cost keeps the prompt's
    previous plan (stable chunking); one that makes the old plan clearly worse replaces it."""
    import dataclasses

    from dcpp.chunker.planner import default_plan, plan_cost

    pred = _make()
    n = 131072
    first = pred.plan(n)
    nudged = dataclasses.replace(LLAMA8B_P4, c=3 * LLAMA8B_P4.c)
    optimum = default_plan(nudged, n, pred.spec)
    assert optimum != first  # the new model's optimum differs, by little
    assert plan_cost(nudged, first, 4) <= 1.02 * plan_cost(nudged, optimum, 4)
    pred.set_model(nudged)
    assert pred.plan(n) == first
    assert _walk(pred, n) == first  # next_chunk follows the kept plan
    assert pred.plan(n // 2) == default_plan(nudged, n // 2, pred.spec)  # a new prompt

    far = dataclasses.replace(LLAMA8B_P4, c=40 * LLAMA8B_P4.c)
    best = default_plan(far, n, pred.spec)
    assert plan_cost(far, first, 4) > 1.02 * plan_cost(far, best, 4)
    pred.set_model(far)
    assert pred.plan(n) == best
    # Equal-time is vllm-ascend's rule: always the rule's plan for the model in use.
    et = _make(cfg=ProfilingChunkConfig(enabled=True, min_chunk=2048, plan_mode="equal_time"))
    et.plan(n)
    et.set_model(nudged)
    assert et.plan(n) == default_plan(nudged, n, et.spec, mode="equal_time")
