"""Triton kernels with a dispatch to the PyTorch reference.

``impl="auto"`` uses Triton for CUDA or NPU tensors, or for any tensors when
``TRITON_INTERPRET=1`` (and Triton is installed), and the reference otherwise; ``"triton"`` and
``"reference"`` force one (``"triton"`` on CPU tensors runs the Triton interpreter).
"""

from __future__ import annotations

import torch

from dcpp.kernels._loader import interpret_requested, triton_available
from dcpp.reference import attention as _ref_attention
from dcpp.reference import kv_cache as _ref_kv_cache

IMPLS = ("auto", "triton", "reference")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to "triton" or "reference" for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    if not triton_available():
        return "reference"
    if device.type in ("cuda", "npu") or interpret_requested():
        return "triton"
    return "reference"


def chunked_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context_len + query_len
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query.dtype
    if resolve_impl(impl, query.device) == "triton":
        from dcpp.kernels.attention import chunked_prefill_attention as fn
    else:
        fn = _ref_attention.chunked_prefill_attention
    return fn(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, scale=scale)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional: returns new caches, inputs untouched (like the reference)."""
    if resolve_impl(impl, key.device) == "triton":
        from dcpp.kernels.kv_cache import write_kv as fn
    else:
        fn = _ref_kv_cache.write_kv
    return fn(key, value, key_cache, value_cache, slot_mapping)


def write_kv_(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: writes into and returns ``key_cache``/``value_cache``."""
    if resolve_impl(impl, key.device) == "triton":
        from dcpp.kernels.kv_cache import write_kv_ as fn

        return fn(key, value, key_cache, value_cache, slot_mapping)
    new_k, new_v = _ref_kv_cache.write_kv(key, value, key_cache, value_cache, slot_mapping)
    key_cache.copy_(new_k)
    value_cache.copy_(new_v)
    return key_cache, value_cache


__all__ = ["chunked_prefill_attention", "write_kv", "write_kv_", "resolve_impl", "IMPLS"]
