"""Prefix cache: chained block hashes, lookup, reference-counted allocation and LRU eviction.

Bookkeeping only (no tensors): one ``PrefixCache`` manages the block ids of one paged KV pool.
Every pipeline stage owns its own layers' cache tensors but uses the same block ids, so a single
``PrefixCache`` serves all stages.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal whole
prefixes. Only full blocks are hashed; a partially filled block is never a hit. A lookup is capped
so that at least the last prompt token is recomputed (its logits must come from a forward pass).

Block states (every block is in exactly one):

- free: ref_count 0, no hash; handed out first by ``allocate``.
- in use: ref_count > 0, with or without a hash.
- evictable: ref_count 0 with a hash; still hits on lookup, reclaimed least-recently-used first
  when the free list is empty. Eviction drops the hash, so the block no longer hits.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from typing import Sequence

_HASH_BYTES = 8  # block hashes are unsigned 64-bit ints
_MAX_HASH = 1 << (8 * _HASH_BYTES)


def _token_list(token_ids: Sequence[int]) -> list[int]:
    """``token_ids`` (list, tuple, range, 1-D tensor or array) as a list of Python ints."""
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Deterministic 64-bit hash of one block: sha256 over the parent hash and the token ids.

    ``parent_hash`` is None for the first block of a sequence. Unlike Python's ``hash()`` the
    result does not depend on the process (no salting), so all processes agree on it.
    """
    tokens = _token_list(token_ids)
    if parent_hash is None:
        head = b"\x00"
    elif 0 <= parent_hash < _MAX_HASH:
        head = b"\x01" + struct.pack("<Q", parent_hash)
    else:
        raise ValueError(f"parent_hash={parent_hash} must be None or in [0, 2**64)")
    try:
        body = struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must fit in int64, got {tokens}") from exc
    digest = hashlib.sha256(head + body).digest()
    return int.from_bytes(digest[:_HASH_BYTES], "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block is ignored)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}; expected >= 1")
    tokens = _token_list(token_ids)
    hashes: list[int] = []
    parent = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


class PrefixCache:
    """Reference-counted block allocator with a hash-chained prefix cache and LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}; expected >= 1")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}; expected >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; LRU first
        self._hash_of: dict[int, int] = {}  # block id -> hash (cached blocks)
        self._block_of: dict[int, int] = {}  # hash -> block id

    # ----------------------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that currently carry a hash (in use or evictable)."""
        return len(self._hash_of)

    def ref_count(self, block_id: int) -> int:
        """Number of live references to ``block_id``."""
        self._check_block_id(block_id)
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` carries a hash (would hit on a lookup of its prefix)."""
        self._check_block_id(block_id)
        return block_id in self._hash_of

    def lookup(self, token_ids: Sequence[int]) -> tuple[int, list[int]]:
        """Longest cached full-block prefix of ``token_ids``: (num_cached_tokens, block_ids).

        Capped so that at least the last token is recomputed: only the first
        ``(len(token_ids) - 1) // block_size`` blocks are candidates. No side effects.
        """
        tokens = _token_list(token_ids)
        max_blocks = max(len(tokens) - 1, 0) // self.block_size
        candidates = tokens[: max_blocks * self.block_size]
        hit_ids: list[int] = []
        for h in block_hashes(candidates, self.block_size):
            block_id = self._block_of.get(h)
            if block_id is None:
                break
            hit_ids.append(block_id)
        return len(hit_ids) * self.block_size, hit_ids

    # ----------------------------------------------------------------------------- updates

    def allocate(self, token_ids: Sequence[int]) -> tuple[int, list[int]]:
        """Blocks for a whole prompt: (num_cached_tokens, block_ids covering all its tokens).

        Takes a reference on each hit block and allocates fresh blocks for the rest, from the free
        list first, then by evicting the least-recently-used evictable block. Raises
        ``RuntimeError`` (and changes nothing) when there are not enough blocks.
        """
        tokens = _token_list(token_ids)
        num_cached, hit_ids = self.lookup(tokens)
        total = -(-len(tokens) // self.block_size)
        needed = total - len(hit_ids)
        # Hit blocks that are evictable now stop being available for fresh allocation.
        reclaimed_hits = sum(1 for b in hit_ids if self._ref[b] == 0)
        available = self.num_free_blocks - reclaimed_hits
        if needed > available:
            raise RuntimeError(
                f"out of KV blocks: {len(tokens)} tokens need {total} blocks of "
                f"block_size={self.block_size} ({len(hit_ids)} cached), so {needed} new ones, "
                f"but only {available} of num_blocks={self.num_blocks} are free or evictable; "
                "free finished sequences or enlarge the pool"
            )
        for block_id in hit_ids:
            self._take_ref(block_id)
        fresh = [self._pop_block() for _ in range(needed)]
        return num_cached, hit_ids + fresh

    def cache_full_blocks(
        self, token_ids: Sequence[int], block_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Register the hashes of the full blocks among the first ``num_computed_tokens`` tokens.

        Idempotent: already registered blocks are skipped. If another block already holds the same
        hash (the same prefix computed twice concurrently), the existing one is kept and this block
        stays uncached.
        """
        tokens = _token_list(token_ids)
        block_ids = [int(b) for b in block_ids]
        if not 0 <= num_computed_tokens <= len(tokens):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens}; expected 0 <= n <= "
                f"len(token_ids)={len(tokens)}"
            )
        num_full = num_computed_tokens // self.block_size
        if len(block_ids) < num_full:
            raise ValueError(
                f"block_ids has {len(block_ids)} entries; expected >= {num_full} full blocks for "
                f"num_computed_tokens={num_computed_tokens}, block_size={self.block_size}"
            )
        hashes = block_hashes(tokens[: num_full * self.block_size], self.block_size)
        for block_id, h in zip(block_ids, hashes):
            self._register(block_id, h)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per entry. Blocks reaching 0 refs stay cached (evictable) if hashed.

        Raises ``ValueError`` (and changes nothing) on a double free. Within one call the blocks
        are released tail first, so a sequence's last block is evicted before its first: evicting
        a parent would orphan its children anyway.
        """
        block_ids = [int(b) for b in block_ids]
        drops: dict[int, int] = {}
        for block_id in block_ids:
            self._check_block_id(block_id)
            drops[block_id] = drops.get(block_id, 0) + 1
        for block_id, n in drops.items():
            if n > self._ref[block_id]:
                raise ValueError(
                    f"double free: block {block_id} freed {n} time(s) but has "
                    f"ref_count={self._ref[block_id]}"
                )
        for block_id in reversed(block_ids):
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                if block_id in self._hash_of:
                    self._evictable[block_id] = None  # most recently used end
                else:
                    self._free.append(block_id)

    # ----------------------------------------------------------------------------- internals

    def _check_block_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, num_blocks={self.num_blocks})")

    def _take_ref(self, block_id: int) -> None:
        if self._ref[block_id] == 0:
            del self._evictable[block_id]
        self._ref[block_id] += 1

    def _pop_block(self) -> int:
        """A fresh block with ref 1: from the free list, else by evicting the LRU cached block."""
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block_id)]
        assert self._ref[block_id] == 0 and block_id not in self._hash_of
        self._ref[block_id] = 1
        return block_id

    def _register(self, block_id: int, h: int) -> None:
        self._check_block_id(block_id)
        if self._ref[block_id] == 0:
            raise ValueError(
                f"block {block_id} has ref_count=0; only allocated blocks can be cached"
            )
        existing = self._hash_of.get(block_id)
        if existing is not None:
            if existing != h:
                raise ValueError(
                    f"block {block_id} already caches hash {existing:#x}; got {h:#x} for it "
                    "(block_ids do not belong to token_ids)"
                )
            return
        if h in self._block_of:
            return  # same prefix already cached in another block; keep that one
        self._hash_of[block_id] = h
        self._block_of[h] = block_id
