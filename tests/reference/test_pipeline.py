"""Chunked, pipelined prefill == the monolithic forward, for any stage count and chunk plan."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcpp.reference.model import ModelConfig, forward, init_params
from dcpp.reference.pipeline import executed_chunks, init_caches, prefill, split_layers
from dcpp.reference.prefix_cache import PrefixCache

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=16)
PARAMS = init_params(CONFIG, seed=0)
BLOCK_SIZE = 8
NUM_BLOCKS = 40
ATOL = 2e-5  # fp32: chunking only reorders the same sums


def random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@st.composite
def chunk_plans(draw):
    n = draw(st.integers(1, 120))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=6))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=chunk_plans(), num_stages=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 10**6))
def test_pipeline_matches_monolithic(plan, num_stages, seed):
    tokens = random_tokens(sum(plan), seed)
    stages = split_layers(CONFIG.num_layers, num_stages)
    caches = init_caches(CONFIG, stages, NUM_BLOCKS, BLOCK_SIZE)
    result = prefill(PARAMS, CONFIG, tokens, plan, stages=stages, caches=caches)
    expected = forward(PARAMS, CONFIG, tokens)
    assert result.num_cached_tokens == 0
    assert result.chunks == plan
    assert len(result.stage_times) == len(plan)
    assert all(len(t) == num_stages and min(t) > 0 for t in result.stage_times)
    torch.testing.assert_close(result.logits, expected, atol=ATOL, rtol=0)


def test_prefix_cache_hit_skips_tokens_and_matches():
    stages = split_layers(CONFIG.num_layers, 2)
    caches = init_caches(CONFIG, stages, NUM_BLOCKS, BLOCK_SIZE)
    pc = PrefixCache(NUM_BLOCKS, BLOCK_SIZE)
    shared = random_tokens(43, 1)
    first = torch.cat([shared, random_tokens(10, 2)])
    second = torch.cat([shared, random_tokens(17, 3)])

    r1 = prefill(PARAMS, CONFIG, first, [20, 20, 13], stages=stages, caches=caches, prefix_cache=pc)
    pc.free(r1.block_ids)
    r2 = prefill(PARAMS, CONFIG, second, [32, 28], stages=stages, caches=r1.caches, prefix_cache=pc)

    assert r2.num_cached_tokens == 40  # 5 full blocks of the 43 shared tokens
    assert r2.block_ids[:5] == r1.block_ids[:5]
    assert r2.chunks == [20]
    assert sum(r2.chunks) == len(second) - 40
    torch.testing.assert_close(r2.logits, forward(PARAMS, CONFIG, second)[40:], atol=ATOL, rtol=0)


def test_fully_cached_prompt_still_recomputes_last_token():
    stages = split_layers(CONFIG.num_layers, 2)
    caches = init_caches(CONFIG, stages, NUM_BLOCKS, BLOCK_SIZE)
    pc = PrefixCache(NUM_BLOCKS, BLOCK_SIZE)
    tokens = random_tokens(32, 4)  # exactly 4 full blocks
    r1 = prefill(PARAMS, CONFIG, tokens, [32], stages=stages, caches=caches, prefix_cache=pc)
    pc.free(r1.block_ids)
    r2 = prefill(PARAMS, CONFIG, tokens, [32], stages=stages, caches=r1.caches, prefix_cache=pc)
    assert r2.num_cached_tokens < 32 and r2.logits.shape[0] >= 1
    torch.testing.assert_close(r2.logits[-1], forward(PARAMS, CONFIG, tokens)[-1], atol=ATOL, rtol=0)


def test_stages_own_only_their_layers_caches():
    stages = split_layers(CONFIG.num_layers, 2, partition=[1, 3])
    assert [list(s) for s in stages] == [[0], [1, 2, 3]]
    caches = init_caches(CONFIG, stages, NUM_BLOCKS, BLOCK_SIZE)
    tokens = random_tokens(30, 5)
    r = prefill(PARAMS, CONFIG, tokens, [11, 19], stages=stages, caches=caches)
    assert [len(c) for c in r.caches] == [1, 3]
    used = torch.tensor(r.block_ids)
    for stage in r.caches:
        for k, v in stage:
            assert k[used].abs().sum() > 0 and v[used].abs().sum() > 0
    # the input caches were not mutated (functional: caches in, caches out)
    assert all(k.abs().sum() == 0 for stage in caches for k, _ in stage)
    torch.testing.assert_close(r.logits, forward(PARAMS, CONFIG, tokens), atol=ATOL, rtol=0)


def test_split_layers_even_and_errors():
    assert [len(r) for r in split_layers(10, 4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="num_stages=5 exceeds num_layers=4"):
        split_layers(4, 5)
    with pytest.raises(ValueError, match="summing to num_layers=4"):
        split_layers(4, 2, partition=[1, 2])
    with pytest.raises(ValueError, match="num_stages=0"):
        split_layers(4, 0)


def test_executed_chunks_and_plan_errors():
    assert executed_chunks([16, 16, 8], 40, 24) == [8, 8]
    assert executed_chunks([10, 6], 40, 24) == [10, 6]
    with pytest.raises(ValueError, match="chunk_sizes sum to 30"):
        executed_chunks([30], 40, 0)
    with pytest.raises(ValueError, match="positive"):
        executed_chunks([40, 0], 40, 0)
    stages = split_layers(CONFIG.num_layers, 2)
    with pytest.raises(ValueError, match="init_caches"):
        prefill(PARAMS, CONFIG, random_tokens(8, 0), [8], stages=stages,
                caches=init_caches(CONFIG, stages[:1], NUM_BLOCKS, BLOCK_SIZE))
