"""Prefix cache: block hashing, lookup, allocation with reference counts, LRU eviction (hand-written
cases; the model-based test is test_prefix_cache_model.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dcpp.reference.prefix_cache import PrefixCache, block_hashes, hash_block_tokens

BS = 4  # block size of the hand-written cases


def run_prompt(cache: PrefixCache, tokens: list[int]) -> tuple[int, list[int]]:
    """Allocate ``tokens``, 'compute' them all and register their full blocks (still referenced)."""
    num_cached, ids = cache.allocate(tokens)
    cache.cache_full_blocks(tokens, ids, len(tokens))
    return num_cached, ids


def finish(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """Run a prompt to completion and free it: its full blocks stay cached (evictable)."""
    _, ids = run_prompt(cache, tokens)
    cache.free(ids)
    return ids


# --------------------------------------------------------------------------------------- hashing


def test_hash_is_deterministic_across_processes():
    code = (
        "from dcpp.reference.prefix_cache import block_hashes;"
        "print(block_hashes(list(range(40)), 8))"
    )
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(res.stdout.strip())
    assert outs == {str(block_hashes(list(range(40)), 8))}


def test_hash_depends_on_parent_tokens_and_order():
    h = hash_block_tokens(None, [1, 2, 3])
    assert 0 <= h < 2**64
    assert h == hash_block_tokens(None, (1, 2, 3))
    assert h != hash_block_tokens(None, [3, 2, 1])
    assert h != hash_block_tokens(0, [1, 2, 3])  # root is not parent 0
    assert h != hash_block_tokens(h, [1, 2, 3])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2, 0])


def test_block_hashes_are_chained_over_full_blocks_only():
    tokens = list(range(11))
    hashes = block_hashes(tokens, BS)
    assert len(hashes) == 2  # the trailing 3 tokens are a partial block
    assert hashes[0] == hash_block_tokens(None, tokens[0:4])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[4:8])
    # Same second block after a different first block: different hash (whole prefix counts).
    other = [9, 9, 9, 9] + tokens[4:8]
    assert block_hashes(other, BS)[1] != hashes[1]
    assert block_hashes(tokens[:8], BS) == hashes
    assert block_hashes([], BS) == []


def test_hash_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"parent_hash=-1"):
        hash_block_tokens(-1, [1])
    with pytest.raises(ValueError, match=r"block_size=0; expected >= 1"):
        block_hashes([1, 2], 0)


# ------------------------------------------------------------------------------ lookup: hit/miss


def test_empty_cache_misses():
    cache = PrefixCache(num_blocks=8, block_size=BS)
    assert cache.lookup(list(range(20))) == (0, [])
    assert cache.lookup([]) == (0, [])


def test_hit_after_prompt_is_cached_and_freed():
    cache = PrefixCache(num_blocks=8, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    ids = finish(cache, prompt)
    # A longer prompt with the same first 10 tokens reuses the 2 full blocks.
    assert cache.lookup(prompt + [50, 51, 52]) == (8, ids[:2])
    # A different first token misses everything (hashes are chained).
    assert cache.lookup([99] + prompt[1:] + [50]) == (0, [])
    # Diverging inside block 1 hits only block 0.
    assert cache.lookup(prompt[:6] + [77, 78, 79]) == (4, ids[:1])


def test_partial_block_never_hits():
    cache = PrefixCache(num_blocks=8, block_size=BS)
    prompt = list(range(7))  # 1 full block + 3 tokens in a partial block
    finish(cache, prompt)
    assert cache.num_cached_blocks == 1
    n, _ = cache.lookup(prompt + [100, 101, 102])
    assert n == 4  # the 3 tokens of the partial block are not reused


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("num_full", [1, 2, 3])
def test_last_token_is_always_recomputed(block_size, num_full):
    cache = PrefixCache(num_blocks=16, block_size=block_size)
    prompt = list(range(num_full * block_size))  # exactly num_full full blocks
    ids = finish(cache, prompt)
    # Same prompt again: the last block is recomputed so the last token gets logits.
    assert cache.lookup(prompt) == ((num_full - 1) * block_size, ids[: num_full - 1])
    # One token more: every full block hits.
    assert cache.lookup(prompt + [7]) == (num_full * block_size, ids)
    num_cached, _ = cache.allocate(prompt)
    assert num_cached <= len(prompt) - 1


def test_lookup_has_no_side_effects():
    cache = PrefixCache(num_blocks=3, block_size=BS)
    a, b = [1] * 4, [2] * 4
    ida = finish(cache, a)
    idb = finish(cache, b)
    before = ([cache.ref_count(i) for i in range(3)], cache.num_free_blocks)
    for _ in range(3):
        assert cache.lookup(a + [0]) == (4, ida)
    assert ([cache.ref_count(i) for i in range(3)], cache.num_free_blocks) == before
    # LRU order unchanged by lookups: a is still evicted before b.
    cache.allocate([3] * 8)  # needs 2 blocks: the free one, then evicts a
    assert cache.lookup(a + [0]) == (0, [])
    assert cache.lookup(b + [0]) == (4, idb)


# ------------------------------------------------------------------------- allocate / ref counts


def test_allocate_covers_all_tokens_and_takes_refs():
    cache = PrefixCache(num_blocks=10, block_size=BS)
    prompt = list(range(10))
    num_cached, ids = cache.allocate(prompt)
    assert num_cached == 0 and len(ids) == 3 and len(set(ids)) == 3
    assert all(cache.ref_count(i) == 1 for i in ids)
    assert cache.num_free_blocks == 7
    cache.cache_full_blocks(prompt, ids, len(prompt))

    # A second sequence sharing the first 8 tokens shares 2 blocks while both are alive.
    num_cached2, ids2 = cache.allocate(prompt[:8] + [40, 41, 42, 43, 44])
    assert num_cached2 == 8 and ids2[:2] == ids[:2]
    assert len(ids2) == 4 and not set(ids2[2:]) & set(ids)
    assert [cache.ref_count(i) for i in ids] == [2, 2, 1]
    cache.free(ids)
    assert [cache.ref_count(i) for i in ids] == [1, 1, 0]
    cache.free(ids2)
    assert all(cache.ref_count(i) == 0 for i in range(10))
    assert cache.num_free_blocks == 10


def test_allocate_empty_prompt():
    cache = PrefixCache(num_blocks=2, block_size=BS)
    assert cache.allocate([]) == (0, [])


def test_hit_on_evictable_block_reclaims_it():
    cache = PrefixCache(num_blocks=4, block_size=BS)
    prompt = list(range(8))
    ids = finish(cache, prompt)
    assert cache.num_free_blocks == 4  # the 2 cached blocks are evictable
    num_cached, ids2 = cache.allocate(prompt + [9])
    assert num_cached == 8 and ids2[:2] == ids
    assert cache.num_free_blocks == 1  # 2 hits + 1 fresh block


def test_out_of_blocks_raises_and_changes_nothing():
    cache = PrefixCache(num_blocks=4, block_size=BS)
    kept = list(range(8))
    _, kept_ids = run_prompt(cache, kept)  # 2 blocks held
    before = [cache.ref_count(i) for i in range(4)]
    with pytest.raises(RuntimeError, match=r"9 tokens need 3 blocks.*only 2 of num_blocks=4"):
        cache.allocate([5] * 9)
    assert [cache.ref_count(i) for i in range(4)] == before
    assert cache.num_free_blocks == 2
    # Hits on referenced blocks need no new blocks: 8 cached + 1 fresh fits.
    num_cached, _ = cache.allocate(kept + [1])
    assert num_cached == 8


def test_out_of_blocks_counts_evictable_hits_as_used():
    cache = PrefixCache(num_blocks=3, block_size=BS)
    prompt = list(range(8))
    ids = finish(cache, prompt)  # 2 evictable + 1 free
    # 8 cached tokens reclaim both evictable blocks; 12 more tokens need 3 fresh: only 1 left.
    with pytest.raises(RuntimeError, match=r"so 3 new ones, but only 1 of num_blocks=3"):
        cache.allocate(prompt + [0] * 12)
    assert cache.num_free_blocks == 3
    assert cache.lookup(prompt + [0]) == (8, ids)


def test_double_free_raises_and_changes_nothing():
    cache = PrefixCache(num_blocks=4, block_size=BS)
    _, ids = cache.allocate(list(range(8)))
    cache.free(ids)
    with pytest.raises(ValueError, match=rf"double free: block {ids[0]} .*ref_count=0"):
        cache.free(ids[:1])
    _, ids = cache.allocate(list(range(8)))
    with pytest.raises(ValueError, match=r"double free.*freed 2 time\(s\) but has ref_count=1"):
        cache.free([ids[1], ids[0], ids[1]])
    assert [cache.ref_count(i) for i in ids] == [1, 1]  # nothing was released


def test_bad_block_ids_and_arguments_raise():
    cache = PrefixCache(num_blocks=4, block_size=BS)
    with pytest.raises(ValueError, match=r"block id 4 out of range \[0, num_blocks=4\)"):
        cache.free([4])
    with pytest.raises(ValueError, match=r"block id -1 out of range"):
        cache.ref_count(-1)
    with pytest.raises(ValueError, match=r"num_blocks=0; expected >= 1"):
        PrefixCache(0, 4)
    with pytest.raises(ValueError, match=r"block_size=0; expected >= 1"):
        PrefixCache(4, 0)


# ---------------------------------------------------------------------------- cache_full_blocks


def test_cache_full_blocks_tracks_chunked_progress():
    cache = PrefixCache(num_blocks=8, block_size=BS)
    prompt = list(range(14))
    _, ids = cache.allocate(prompt)
    probe = prompt + [99]
    cache.cache_full_blocks(prompt, ids, 5)  # first chunk: 5 tokens -> 1 full block
    assert cache.lookup(probe) == (4, ids[:1])
    cache.cache_full_blocks(prompt, ids, 5)  # idempotent
    cache.cache_full_blocks(prompt, ids, 11)  # second chunk ends inside block 2
    assert cache.lookup(probe) == (8, ids[:2])
    cache.cache_full_blocks(prompt, ids, 14)
    assert cache.lookup(probe) == (12, ids[:3])
    assert cache.num_cached_blocks == 3
    assert not cache.is_cached(ids[3])


def test_same_prefix_computed_twice_keeps_first_block():
    cache = PrefixCache(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    _, ids1 = cache.allocate(prompt)  # both allocated before either is cached: no sharing
    _, ids2 = cache.allocate(prompt)
    assert not set(ids1) & set(ids2)
    cache.cache_full_blocks(prompt, ids1, 9)
    cache.cache_full_blocks(prompt, ids2, 9)
    assert cache.lookup(prompt) == (8, ids1[:2])
    assert not cache.is_cached(ids2[0])
    cache.free(ids2)  # the uncached duplicates go straight back to the free list
    assert cache.num_cached_blocks == 2


def test_cache_full_blocks_rejects_bad_arguments():
    cache = PrefixCache(num_blocks=8, block_size=BS)
    prompt = list(range(8))
    _, ids = cache.allocate(prompt)
    msg = r"num_computed_tokens=9; expected 0 <= n <= len\(token_ids\)=8"
    with pytest.raises(ValueError, match=msg):
        cache.cache_full_blocks(prompt, ids, 9)
    with pytest.raises(ValueError, match=r"block_ids has 1 entries; expected >= 2 full blocks"):
        cache.cache_full_blocks(prompt, ids[:1], 8)
    unused = next(i for i in range(8) if i not in ids)
    with pytest.raises(ValueError, match=rf"block {unused} has ref_count=0"):
        cache.cache_full_blocks(prompt, [unused, ids[1]], 8)
    cache.cache_full_blocks(prompt, ids, 8)
    with pytest.raises(ValueError, match=rf"block {ids[0]} already caches hash"):
        cache.cache_full_blocks([7] * 8, ids, 8)


# ------------------------------------------------------------------------------------- eviction


def test_eviction_is_lru_among_unreferenced_blocks():
    cache = PrefixCache(num_blocks=4, block_size=BS)
    a, b, c, held = [1] * 4, [2] * 4, [3] * 4, [4] * 4
    _, held_ids = run_prompt(cache, held)  # referenced: must never be evicted
    ida, idb, idc = finish(cache, a), finish(cache, b), finish(cache, c)  # LRU order: a, b, c
    assert cache.num_free_blocks == 3

    # Reuse a: it becomes most recently used once freed again. Order now: b, c, a.
    num_cached, ids = cache.allocate(a + [0])  # needs 1 fresh block: evicts b
    assert num_cached == 4 and ids[0] == ida[0] and ids[1] == idb[0]
    assert cache.lookup(b + [0]) == (0, [])  # evicted hash no longer hits
    cache.free(ids)  # ids[1] is uncached -> free list; a -> MRU. Order: c, a.

    _, d = cache.allocate([5] * 4)  # the free list first: no eviction
    assert d == idb and cache.lookup(c + [0]) == (4, idc)
    _, e = cache.allocate([6] * 4)  # now evicts c, the LRU unreferenced block
    assert e == idc
    assert cache.lookup(c + [0]) == (0, [])
    assert cache.lookup(a + [0]) == (4, ida)
    assert cache.lookup(held + [0]) == (4, held_ids)
    assert cache.ref_count(held_ids[0]) == 1


def test_one_free_call_evicts_the_tail_first():
    cache = PrefixCache(num_blocks=3, block_size=BS)
    prompt = list(range(12))
    ids = finish(cache, prompt)
    _, new = cache.allocate([7] * 4)
    assert new == [ids[2]]  # the last block goes first, the prefix stays reusable
    assert cache.lookup(prompt) == (8, ids[:2])


def test_evicted_parent_breaks_the_chain():
    cache = PrefixCache(num_blocks=2, block_size=BS)
    prompt = list(range(8))
    ids = finish(cache, prompt)
    cache.free(cache.allocate(prompt[:4] + [0])[1])  # touch block 0: it becomes MRU
    _, new = cache.allocate([9] * 4)  # evicts block 1 (LRU)
    assert new == [ids[1]]
    cache.free(new)
    _, new = cache.allocate([8] * 4)  # free list holds the uncached block: no eviction
    cache.free(new)
    cache.free(cache.allocate([8] * 8)[1])  # evicts the parent, block 0
    assert cache.lookup(prompt + [0]) == (0, [])


# ------------------------------------------------------------------ random operation sequences
