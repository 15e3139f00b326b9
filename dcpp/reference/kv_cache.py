"""Paged KV cache: layout helpers, ``write_kv`` by slot mapping, and gather.

Layout (vLLM): ``cache[num_blocks, block_size, num_kv_heads, head_dim]``; token t of a sequence
lives in block ``block_table[t // block_size]`` at offset ``t % block_size``, i.e. at slot
``block_id * block_size + offset`` of the flattened cache. Slot -1 means "do not write".
"""

from __future__ import annotations

import torch

from dcpp.reference.checks import check_write_kv_inputs


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return new caches with ``key``/``value`` written at ``slot_mapping`` (inputs untouched)."""
    check_write_kv_inputs(key, value, key_cache, value_cache, slot_mapping)
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    write_kv_inplace(key, value, key_cache, value_cache, slot_mapping)
    return key_cache, value_cache


def write_kv_inplace(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """``write_kv`` into the given (contiguous) caches, as an engine does; used where copying
    the whole cache per layer would distort timings. Inputs are not validated here."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep]


def slot_mapping_for(
    block_ids: torch.Tensor,  # [num_blocks_of_seq] int
    start: int,
    end: int,
    block_size: int,
) -> torch.Tensor:  # [end - start] int64
    """Slots of token positions ``start..end-1`` of one sequence whose blocks are ``block_ids``."""
    pos = torch.arange(start, end, device=block_ids.device)
    return block_ids.long()[pos // block_size] * block_size + pos % block_size


def gather_kv(
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [max_blocks_per_seq] int
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [seq_len, num_kv_heads, head_dim]
    """Contiguous K/V of the first ``seq_len`` tokens of one sequence."""
    block_size = key_cache.shape[1]
    slots = slot_mapping_for(block_ids, 0, seq_len, block_size)
    k = key_cache.flatten(0, 1)[slots]
    v = value_cache.flatten(0, 1)[slots]
    return k, v
