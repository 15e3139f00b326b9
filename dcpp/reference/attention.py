"""Reference chunked-prefill attention over a paged KV cache (vLLM layouts).

Each query token of sequence i sits at absolute position ``context_len + j`` where
``context_len = seq_len - query_len``; it attends to every cached token of its sequence at a
position <= its own (the prefix plus the causal part of its own chunk). The chunk's own K/V are
already written to the cache. Math in fp32; the output has the query's dtype.
"""

from __future__ import annotations

import math

import torch

from dcpp.reference.checks import check_attention_inputs
from dcpp.reference.kv_cache import gather_kv


def chunked_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context_len + query_len
    *,
    scale: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query.dtype
    query_lens, seq_lens_list = check_attention_inputs(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens
    )
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(query)
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens_list)):
        if query_len == 0:
            continue
        context_len = seq_len - query_len
        q = query[start : start + query_len].float()  # [query_len, num_heads, head_dim]
        k, v = gather_kv(key_cache, value_cache, block_table[i], seq_len)  # [seq_len, kv, d]
        k = k.float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [num_heads, query_len, seq_len]
        q_pos = context_len + torch.arange(query_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        visible = k_pos[None, :] <= q_pos[:, None]  # [query_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hqk,khd->qhd", probs, v)  # [query_len, num_heads, head_dim]
        out[start : start + query_len] = o.to(query.dtype)
        start += query_len
    return out
