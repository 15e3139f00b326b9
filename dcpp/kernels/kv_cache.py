"""Triton KV-cache write by slot mapping (same contract as ``dcpp.reference.write_kv``).

``write_kv`` is functional like the reference (returns new caches, inputs untouched); ``write_kv_``
writes in place and returns the same cache tensors (what a serving engine wants). The kernel is a
bit copy: float tensors are viewed as same-width integers, so it is exact for every dtype (NaN
payloads included) and immune to the interpreter's bf16 quirks. One token per program iteration:
a scalar slot load, then one block copy of ``[num_kv_heads, head_dim]``; slot -1 is skipped.
"""

from __future__ import annotations

import torch

from dcpp.kernels._loader import load_kernels, num_compute_units, triton_mode, use_interpreter
from dcpp.reference.checks import check_same_device, check_write_kv_inputs

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check(key, value, key_cache, value_cache, slot_mapping) -> None:
    check_write_kv_inputs(key, value, key_cache, value_cache, slot_mapping)
    check_same_device("key", key, value=value, key_cache=key_cache, value_cache=value_cache,
                      slot_mapping=slot_mapping)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return new caches with ``key``/``value`` written at ``slot_mapping`` (inputs untouched)."""
    _check(key, value, key_cache, value_cache, slot_mapping)
    new_k, new_v = key_cache.clone(), value_cache.clone()
    launch_write_kv(key, value, new_k, new_v, slot_mapping)
    return new_k, new_v


def write_kv_(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place ``write_kv``: writes into and returns ``key_cache``/``value_cache``."""
    _check(key, value, key_cache, value_cache, slot_mapping)
    launch_write_kv(key, value, key_cache, value_cache, slot_mapping)
    return key_cache, value_cache


def launch_write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    slot_mapping: torch.Tensor,  # [num_tokens] int
    *,
    max_programs: int | None = None,
) -> None:
    """Launcher: inputs already validated; writes the caches in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = key_cache.shape[1]
    if num_tokens == 0:
        return
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        # A copy would silently drop the writes: the caller must pass writable strided caches.
        assert t.stride(-1) == 1, f"{name} needs unit stride along head_dim"
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    int_dtype = _INT_VIEW[key.element_size()]
    k_src, v_src = key.view(int_dtype), value.view(int_dtype)  # bit copy
    k_dst, v_dst = key_cache.view(int_dtype), value_cache.view(int_dtype)
    device = key.device
    interpret = use_interpreter(device)
    if max_programs is None:
        # Persistent grid: a few programs per SM / AI core; the interpreter runs one per token.
        max_programs = num_tokens if interpret else 8 * num_compute_units(device)
    grid = (max(1, min(num_tokens, max_programs)),)
    launch_kwargs = {}
    if device.type == "cuda" and not interpret:
        launch_kwargs = dict(num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)
    kernels = load_kernels(interpret)
    with triton_mode(interpret):
        kernels.write_kv_kernel[grid](
            k_src, v_src, k_dst, v_dst, slot_mapping, num_tokens, num_kv_heads,
            k_src.stride(0), k_src.stride(1), v_src.stride(0), v_src.stride(1),
            k_dst.stride(0), k_dst.stride(1), k_dst.stride(2),
            v_dst.stride(0), v_dst.stride(1), v_dst.stride(2),
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_H=_next_pow2(num_kv_heads), BLOCK_D=_next_pow2(head_dim),
            **launch_kwargs,
        )
