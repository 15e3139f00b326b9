"""Paged KV cache: write_kv by slot mapping, slot_mapping_for, and gather_kv round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpp.reference.kv_cache import gather_kv, slot_mapping_for, write_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poisoned_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype):
    """A cache full of NaN, so any slot written by mistake (or left unwritten) shows."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    nan = float("nan")
    return torch.full(shape, nan, dtype=dtype), torch.full(shape, nan, dtype=dtype)


def rand_kv(num_tokens, num_kv_heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    return k, v  # each [num_tokens, num_kv_heads, head_dim]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_writes_land_at_block_times_block_size_plus_offset(dtype, slot_dtype):
    num_blocks, block_size, kvh, d = 6, 5, 2, 8
    key_cache, value_cache = poisoned_cache(num_blocks, block_size, kvh, d, dtype)
    targets = [(3, 0), (0, 4), (5, 2), (1, 1)]  # (block_id, offset)
    key, value = rand_kv(len(targets), kvh, d, dtype)
    slots = torch.tensor([b * block_size + o for b, o in targets], dtype=slot_dtype)

    new_k, new_v = write_kv(key, value, key_cache, value_cache, slots)

    assert new_k.shape == key_cache.shape and new_k.dtype == dtype
    for i, (b, o) in enumerate(targets):
        assert torch.equal(new_k[b, o], key[i])
        assert torch.equal(new_v[b, o], value[i])
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, o in targets:
        written[b, o] = True
    assert new_k[~written].isnan().all() and new_v[~written].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_minus_one_is_skipped(dtype):
    key_cache, value_cache = poisoned_cache(2, 4, 1, 4, dtype)
    key, value = rand_kv(3, 1, 4, dtype)
    slots = torch.tensor([-1, 6, -1])
    new_k, new_v = write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(new_k[1, 2], key[1]) and torch.equal(new_v[1, 2], value[1])
    assert new_k.isnan().sum() == key_cache.isnan().sum() - key[1].numel()
    # All slots -1: nothing written at all.
    new_k, new_v = write_kv(key, value, key_cache, value_cache, torch.full((3,), -1))
    assert new_k.isnan().all() and new_v.isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_are_not_mutated(dtype):
    key_cache, value_cache = rand_kv(3 * 4, 2, 8, dtype, seed=1)
    key_cache, value_cache = key_cache.view(3, 4, 2, 8), value_cache.view(3, 4, 2, 8)
    key, value = rand_kv(5, 2, 8, dtype, seed=2)
    slots = torch.tensor([0, 3, -1, 11, 7])
    originals = [t.clone() for t in (key, value, key_cache, value_cache, slots)]

    new_k, new_v = write_kv(key, value, key_cache, value_cache, slots)

    for t, orig in zip((key, value, key_cache, value_cache, slots), originals):
        assert torch.equal(t, orig)
    assert new_k.data_ptr() != key_cache.data_ptr()
    assert new_v.data_ptr() != value_cache.data_ptr()
    assert not torch.equal(new_k, key_cache)


def test_empty_write_returns_equal_caches():
    key_cache, value_cache = poisoned_cache(2, 3, 1, 4, torch.float32)
    key, value = rand_kv(0, 1, 4, torch.float32)
    new_k, new_v = write_kv(key, value, key_cache, value_cache, torch.empty(0, dtype=torch.int64))
    assert new_k.shape == key_cache.shape and new_k.isnan().all() and new_v.isnan().all()


def test_slot_mapping_for_hand_example():
    block_ids = torch.tensor([7, 2, 5], dtype=torch.int32)
    # block_size 4: positions 2..9 -> blocks 7,7,2,2,2,2,5,5 at offsets 2,3,0,1,2,3,0,1
    slots = slot_mapping_for(block_ids, 2, 10, 4)
    assert slots.tolist() == [30, 31, 8, 9, 10, 11, 20, 21]
    assert slot_mapping_for(block_ids, 3, 3, 4).numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_round_trip_with_gather_over_permuted_block_tables(dtype, block_size):
    """Several sequences on permuted blocks with spare blocks: gather returns what was written."""
    g = torch.Generator().manual_seed(block_size)
    seq_lens = [1, 7, 2 * block_size, 3 * block_size + 1]
    kvh, d = 2, 8
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 5  # spare blocks stay NaN
    perm = torch.randperm(num_blocks, generator=g)
    key_cache, value_cache = poisoned_cache(num_blocks, block_size, kvh, d, dtype)

    tables, expected, start = [], [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, need)):
        block_ids = perm[start : start + nb]  # [nb]
        start += nb
        k, v = rand_kv(n, kvh, d, dtype, seed=100 + i)
        key_cache, value_cache = write_kv(
            k, v, key_cache, value_cache, slot_mapping_for(block_ids, 0, n, block_size)
        )
        tables.append(block_ids)
        expected.append((k, v))

    for n, block_ids, (k, v) in zip(seq_lens, tables, expected):
        gk, gv = gather_kv(key_cache, value_cache, block_ids, n)
        assert gk.dtype == dtype and gk.shape == (n, kvh, d)
        assert torch.equal(gk, k) and torch.equal(gv, v)
    unused = perm[start:]
    assert key_cache[unused].isnan().all() and value_cache[unused].isnan().all()


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.integers(1, 6),
    seq_len=st.integers(1, 30),
    cuts=st.lists(st.integers(1, 29), max_size=5),
    seed=st.integers(0, 2**16),
)
def test_chunked_writes_equal_one_write(block_size, seq_len, cuts, seed):
    """Writing a sequence chunk by chunk (any plan) equals writing it at once (DESIGN.md §5.8)."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-seq_len // block_size)
    num_blocks = nb + 2
    block_ids = torch.randperm(num_blocks, generator=g)[:nb]
    k, v = rand_kv(seq_len, 1, 4, torch.float32, seed=seed)
    kc0, vc0 = poisoned_cache(num_blocks, block_size, 1, 4, torch.float32)

    whole_k, whole_v = write_kv(k, v, kc0, vc0, slot_mapping_for(block_ids, 0, seq_len, block_size))

    bounds = sorted({0, seq_len, *(c for c in cuts if c < seq_len)})
    kc, vc = kc0, vc0
    for lo, hi in zip(bounds, bounds[1:]):
        slots = slot_mapping_for(block_ids, lo, hi, block_size)
        kc, vc = write_kv(k[lo:hi], v[lo:hi], kc, vc, slots)
    assert torch.equal(kc.nan_to_num(7.0), whole_k.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), whole_v.nan_to_num(7.0))
    gk, gv = gather_kv(kc, vc, block_ids, seq_len)
    assert torch.equal(gk, k) and torch.equal(gv, v)
