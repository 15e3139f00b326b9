"""Prefix cache against a model of itself: hypothesis drives random sequences of lookups,
allocations, progress and frees (`PrefixCacheMachine`); the hand-written cases are in
test_prefix_cache.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from dcpp.reference.prefix_cache import PrefixCache


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random allocate / compute / free / lookup against a simple model of what must hold.

    The model records, per cached block, the full token prefix it ends (so a hit can be checked
    against the prompt), and the references each live sequence holds.
    """

    seqs = Bundle("seqs")

    @initialize(block_size=st.sampled_from([1, 2, 3]), num_blocks=st.integers(1, 8))
    def init(self, block_size, num_blocks):
        self.cache = PrefixCache(num_blocks, block_size)
        self.prefix_of: dict[int, tuple[int, ...]] = {}  # cached block -> tokens up to its end
        self.live: dict[int, list] = {}  # seq id -> [tokens, block_ids, num_computed]
        self.next_id = 0

    def _check_hits(self, tokens, num_cached, ids):
        bs = self.cache.block_size
        assert num_cached == len(ids) * bs
        assert num_cached <= max(len(tokens) - 1, 0)
        for i, b in enumerate(ids):
            assert self.prefix_of.get(b) == tuple(tokens[: (i + 1) * bs])

    @rule(target=seqs, tokens=st.lists(st.integers(0, 1), min_size=0, max_size=10))
    def allocate(self, tokens):
        cache = self.cache
        refs_before = [cache.ref_count(b) for b in range(cache.num_blocks)]
        n_hit, hit_ids = cache.lookup(tokens)
        needed = -(-len(tokens) // cache.block_size) - len(hit_ids)
        available = cache.num_free_blocks - sum(1 for b in hit_ids if refs_before[b] == 0)
        try:
            num_cached, ids = cache.allocate(tokens)
        except RuntimeError:
            assert needed > available
            assert [cache.ref_count(b) for b in range(cache.num_blocks)] == refs_before
            return None
        assert needed <= available
        assert (num_cached, ids[: len(hit_ids)]) == (n_hit, hit_ids)
        self._check_hits(tokens, num_cached, hit_ids)
        assert len(ids) == -(-len(tokens) // cache.block_size)
        for b in ids[len(hit_ids) :]:
            assert refs_before[b] == 0  # never hand out a referenced block
            self.prefix_of.pop(b, None)  # fresh (possibly evicted) block: no longer cached
        for b in set(ids):
            assert cache.ref_count(b) == refs_before[b] + ids.count(b)
        sid = self.next_id
        self.next_id += 1
        self.live[sid] = [list(tokens), ids, num_cached]
        return sid

    @rule(sid=seqs, data=st.data())
    def compute(self, sid, data):
        if sid not in self.live:
            return
        tokens, ids, done = self.live[sid]
        done = data.draw(st.integers(done, len(tokens)))
        self.live[sid][2] = done
        self.cache.cache_full_blocks(tokens, ids, done)
        bs = self.cache.block_size
        for i in range(done // bs):
            prefix = tuple(tokens[: (i + 1) * bs])
            if self.cache.is_cached(ids[i]):
                self.prefix_of.setdefault(ids[i], prefix)
                assert self.prefix_of[ids[i]] == prefix

    @rule(sid=consumes(seqs))
    def free(self, sid):
        if sid is None or sid not in self.live:
            return
        _, ids, _ = self.live.pop(sid)
        self.cache.free(ids)
        if ids:
            with pytest.raises(ValueError, match="double free"):
                # Every one of these blocks now has fewer refs than a second free would drop.
                self.cache.free(ids * (self.cache.ref_count(ids[0]) + 1))

    @rule(tokens=st.lists(st.integers(0, 1), max_size=10))
    def lookup(self, tokens):
        self._check_hits(tokens, *self.cache.lookup(tokens))

    @invariant()
    def ref_counts_match_live_sequences(self):
        cache = self.cache
        expected = [0] * cache.num_blocks
        for _, ids, _ in self.live.values():
            for b in ids:
                expected[b] += 1
        actual = [cache.ref_count(b) for b in range(cache.num_blocks)]
        assert actual == expected  # in particular never negative
        assert cache.num_free_blocks == actual.count(0)
        assert cache.num_cached_blocks == len(self.prefix_of)


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
