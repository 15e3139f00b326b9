"""Triton chunked-prefill attention over a paged KV cache (same signature as the reference).

Public function -> checked wrapper -> launcher (DESIGN.md §5.2). The kernel runs one persistent
1-D grid over work items (sequence, query tile, kv_head). GQA: the query heads that share one KV
head are packed into the M dimension of the query tile (row = token * GROUP_PAD + head), so one
K/V tile load serves the whole group. KV tile = one page (or a slice of one) when the page size is
a power of 2 >= 16, which gives one scalar block-id load per tile and affine addresses; smaller or
non-power-of-2 pages use tiles that span several pages with a block id per position. Online
softmax in fp32 (exp2 with log2(e) folded into the scale). KV tiles wholly inside the visible
prefix of every row of a query tile skip all mask work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dcpp.kernels._loader import load_kernels, num_compute_units, triton_mode, use_interpreter
from dcpp.reference.checks import check_attention_inputs, check_same_device

LOG2E = 1.4426950408889634


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class AttentionLaunchConfig:
    """Tunables of one launch (per backend; see ``default_attention_config``)."""

    block_m: int = 128
    """Target rows of the packed query tile: query tokens x query heads of one KV head."""
    block_n: int = 64
    """Target KV positions per tile (capped at the page size on the paged-tile path)."""
    num_warps: int = 8
    """CUDA only."""
    num_stages: int = 2
    """CUDA only: software-pipelining depth of the KV loop."""
    programs_per_unit: int | None = None
    """Persistent grid = programs_per_unit x compute units (SMs / AI cores); None = one program
    per work item (the hardware scheduler then balances, work items sorted longest first)."""


def default_attention_config(device: torch.device, head_dim: int, interpret: bool
                             ) -> AttentionLaunchConfig:
    if interpret:
        # The interpreter costs ~5 ms per program-iteration regardless of tile size: big tiles.
        return AttentionLaunchConfig(block_m=64, block_n=32, programs_per_unit=None)
    if device.type == "npu":
        return AttentionLaunchConfig(block_m=128, block_n=128, programs_per_unit=1)
    if head_dim <= 64:
        return AttentionLaunchConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return AttentionLaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


@dataclass(frozen=True)
class AttentionTiling:
    """Tile shape chosen for one batch (all powers of 2; dot dims >= 16)."""

    group: int
    group_pad: int
    block_q: int
    block_m: int
    block_n: int
    block_d: int
    paged_tile: bool
    """True when every KV tile lies inside one page (page size a power of 2 >= 16)."""


def choose_tiling(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                  max_query_len: int, config: AttentionLaunchConfig) -> AttentionTiling:
    group = num_heads // num_kv_heads
    group_pad = _next_pow2(group)
    block_q = max(1, config.block_m // group_pad)
    block_q = min(block_q, _next_pow2(max(1, max_query_len)))  # decode-only batches: small tiles
    block_q = max(block_q, 16 // group_pad)  # keep M >= 16 for tl.dot
    block_m = block_q * group_pad
    target_n = max(16, _next_pow2(config.block_n))
    pow2_page = block_size & (block_size - 1) == 0
    if pow2_page and block_size >= 16:
        block_n, paged_tile = min(block_size, target_n), True
    else:
        block_n, paged_tile = target_n, False
    block_d = max(16, _next_pow2(head_dim))
    assert block_m >= 16 and block_n >= 16 and block_d >= 16
    return AttentionTiling(group, group_pad, block_q, block_m, block_n, block_d, paged_tile)


def build_work_list(query_lens: list[int], seq_lens: list[int], block_q: int,
                    num_programs: int | None) -> list[tuple[int, int]]:
    """Work items (sequence, first query index of the tile), costliest first.

    Cost of an item ~ number of visible KV positions of its last row. With a persistent grid of
    ``num_programs`` programs taking items round-robin, rounds alternate direction (snake order)
    so that no program always gets the largest item of each round.
    """
    items = []
    for seq, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        context_len = seq_len - query_len
        for start in range(0, query_len, block_q):
            cost = context_len + min(start + block_q, query_len)
            items.append((cost, seq, start))
    items.sort(key=lambda x: -x[0])
    ordered = [(seq, start) for _, seq, start in items]
    if num_programs and num_programs > 1:
        snake = []
        for r, i in enumerate(range(0, len(ordered), num_programs)):
            chunk = ordered[i : i + num_programs]
            snake.extend(chunk if r % 2 == 0 else chunk[::-1])
        ordered = snake
    return ordered


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
    """Triton version of ``dcpp.reference.chunked_prefill_attention`` (same contract)."""
    query_lens, seq_lens_list = check_attention_inputs(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens
    )
    check_same_device("query", query, key_cache=key_cache, value_cache=value_cache,
                      block_table=block_table, query_start_loc=query_start_loc,
                      seq_lens=seq_lens)
    return launch_attention(query, key_cache, value_cache, block_table, query_start_loc,
                            seq_lens, query_lens, seq_lens_list, scale=scale)


def launch_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    query_lens: list[int],
    seq_lens_list: list[int],
    *,
    scale: float | None = None,
    config: AttentionLaunchConfig | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Launcher: inputs already validated. ``config`` overrides the backend default."""
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    device = query.device
    interpret = use_interpreter(device)
    if config is None:
        config = default_attention_config(device, head_dim, interpret)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    # The kernel assumes unit stride along head_dim; everything else goes through strides.
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key_cache.stride(-1) != 1:
        key_cache = key_cache.contiguous()
    if value_cache.stride(-1) != 1:
        value_cache = value_cache.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()

    tiling = choose_tiling(num_heads, num_kv_heads, head_dim, block_size,
                           max(query_lens), config)
    num_programs = None
    if config.programs_per_unit is not None and not interpret:
        num_programs = config.programs_per_unit * num_compute_units(device)
    work = build_work_list(query_lens, seq_lens_list, tiling.block_q, num_programs)
    work_t = torch.tensor(work, dtype=torch.int32).reshape(-1, 2).to(device)  # [num_items, 2]
    total = len(work) * num_kv_heads
    grid = (min(total, num_programs) if num_programs else total,)

    compute_fp32 = interpret or query.dtype == torch.float32
    # Under the interpreter write fp32 and round with torch (exactly like the reference).
    out_k = out if not (interpret and query.dtype != torch.float32) else torch.empty(
        query.shape, dtype=torch.float32, device=device)  # [num_tokens, num_heads, head_dim]

    launch_kwargs = {}
    if device.type == "cuda" and not interpret:
        launch_kwargs = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    kernels = load_kernels(interpret)
    with triton_mode(interpret):
        kernels.chunked_prefill_attention_kernel[grid](
            out_k, query, key_cache, value_cache, block_table, query_start_loc, seq_lens, work_t,
            len(work), num_kv_heads,
            query.stride(0), query.stride(1), out_k.stride(0), out_k.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_table.stride(0),
            scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GROUP=tiling.group,
            GROUP_PAD=tiling.group_pad, BLOCK_Q=tiling.block_q, BLOCK_M=tiling.block_m,
            BLOCK_N=tiling.block_n, BLOCK_D=tiling.block_d, PAGED_TILE=tiling.paged_tile,
            COMPUTE_FP32=compute_fp32,
            **launch_kwargs,
        )
    if out_k is not out:
        out.copy_(out_k)
    return out
