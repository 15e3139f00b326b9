"""Shared test-case builder and error checks for attention parity (reference and kernels).

- ``AttentionCase`` names a batch; ``make_attention_inputs`` builds it in vLLM layouts with a
  permuted block table, spare blocks, extra table columns pointing at spare blocks, and NaN in
  every cache slot that no sequence uses (a missing mask shows up as NaN).
- ``dense_attention`` is an oracle independent of ``dcpp.reference``: its own gather, an explicit
  boolean mask, torch SDPA in float64 (or, for a low-precision baseline, the same math step by
  step in the input dtype).
- ``assert_close(name, ref, out, baseline=...)`` prints max and RMS error and applies the
  FlashAttention-style bound of DESIGN.md §5.5: error(out vs ref) <= 2 x error(baseline vs ref)
  + floor, where the floor is twice the rounding error of the output dtype at ``ref``'s scale.

Imports only torch (no numpy, no dcpp.reference), so kernel tests can use it in any venv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionCase:
    """One batch of chunked-prefill attention."""

    name: str
    query_lens: tuple[int, ...]
    """Tokens of this chunk per sequence (1 = decode, 0 = idle sequence)."""
    context_lens: tuple[int, ...]
    """Cached tokens before the chunk per sequence (seq_len = context_len + query_len)."""
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    block_size: int = 16
    spare_blocks: int = 3
    """Blocks no sequence uses (NaN-poisoned, mixed into the permutation)."""
    extra_table_cols: int = 1
    """Block-table columns past the longest sequence (they point at spare blocks)."""
    seed: int = 0

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.context_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(q + c for q, c in zip(self.query_lens, self.context_lens))


@dataclass
class AttentionInputs:
    """Tensors of one case, in the argument order of ``chunked_prefill_attention``."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    scale: float
    case: AttentionCase = field(repr=False)

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.query, self.key_cache, self.value_cache, self.block_table,
                self.query_start_loc, self.seq_lens)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_attention_inputs(case: AttentionCase, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> AttentionInputs:
    """Build a case; values are ``randn`` in fp32 rounded to ``dtype`` (same data per dtype)."""
    gen = torch.Generator().manual_seed(case.seed)
    bs = case.block_size
    seq_lens = case.seq_lens
    blocks_needed = [_cdiv(s, bs) for s in seq_lens]
    num_blocks = sum(blocks_needed) + case.spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)  # [num_blocks]
    spare = perm[sum(blocks_needed):]  # [spare_blocks]
    width = max([1, *blocks_needed]) + case.extra_table_cols
    block_table = torch.empty(len(seq_lens), width, dtype=torch.int32)  # [num_seqs, width]
    used = torch.zeros(num_blocks * bs, dtype=torch.bool)  # [num_slots]
    offset = 0
    for i, (need, seq_len) in enumerate(zip(blocks_needed, seq_lens)):
        ids = perm[offset : offset + need]
        offset += need
        filler = spare if spare.numel() else perm[:1]
        pad = filler[torch.arange(width - need) % filler.numel()]
        block_table[i] = torch.cat([ids, pad]).to(torch.int32)
        for pos in range(seq_len):
            used[int(ids[pos // bs]) * bs + pos % bs] = True
    shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    unused = ~used.view(num_blocks, bs)  # [num_blocks, block_size]
    key_cache[unused] = float("nan")
    value_cache[unused] = float("nan")
    num_tokens = sum(case.query_lens)
    query = torch.randn(num_tokens, case.num_heads, case.head_dim, generator=gen).to(dtype)
    qsl = [0]
    for q in case.query_lens:
        qsl.append(qsl[-1] + q)
    to = dict(device=device)
    return AttentionInputs(
        query=query.to(**to),
        key_cache=key_cache.to(**to),
        value_cache=value_cache.to(**to),
        block_table=block_table.to(**to),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=1.0 / math.sqrt(case.head_dim),
        case=case,
    )


def dense_attention(inp: AttentionInputs, compute_dtype: torch.dtype = torch.float64
                    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], compute_dtype
    """Oracle on gathered K/V with an explicit mask, independent of ``dcpp.reference``.

    float64: torch SDPA. Any other dtype: scores, softmax and P @ V each rounded to that dtype
    (the low-precision baseline of the error bound).
    """
    case = inp.case
    bs = case.block_size
    group = case.num_heads // case.num_kv_heads
    table = inp.block_table.cpu().tolist()
    q_all = inp.query.cpu().to(compute_dtype)  # [num_tokens, num_heads, head_dim]
    k_flat = inp.key_cache.cpu().to(compute_dtype).flatten(0, 1)  # [num_slots, kv_heads, d]
    v_flat = inp.value_cache.cpu().to(compute_dtype).flatten(0, 1)
    out = torch.zeros_like(q_all)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(case.query_lens, case.context_lens)):
        seq_len = q_len + ctx_len
        if q_len == 0:
            continue
        slots = torch.tensor([table[i][p // bs] * bs + p % bs for p in range(seq_len)])
        k = k_flat[slots].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len, d]
        v = v_flat[slots].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len, d]
        q = q_all[start : start + q_len].transpose(0, 1)  # [H, q_len, d]
        q_pos = torch.arange(ctx_len, seq_len)[:, None]  # [q_len, 1]
        mask = torch.arange(seq_len)[None, :] <= q_pos  # [q_len, seq_len] True = visible
        if compute_dtype == torch.float64:
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=inp.scale)  # [H, q_len, d]
        else:
            s = (q @ k.transpose(1, 2)) * inp.scale  # [H, q_len, seq_len]
            s = s.masked_fill(~mask, float("-inf"))
            p = torch.softmax(s, dim=-1)  # rounded to compute_dtype
            o = p @ v  # [H, q_len, d]
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding error of ``dtype`` at the values of ``ref`` (FlashAttention's atol)."""
    r = ref.to(dtype)
    return 2.0 * float(((r + 0.3) - 0.3 - r).abs().max()) if r.numel() else 0.0


def errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max abs error, RMS error) of ``out`` against ``ref``, in float64."""
    d = out.detach().cpu().double() - ref.detach().cpu().double()
    if d.numel() == 0:
        return 0.0, 0.0
    return float(d.abs().max()), float(d.pow(2).mean().sqrt())


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, *,
                 baseline: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 factor: float = 2.0, atol: float | None = None) -> dict:
    """Labelled check of ``out`` against the high-precision ``ref``; prints max and RMS error.

    With ``baseline`` (the same computation done in low precision): max and RMS errors of ``out``
    must be <= ``factor`` x those of ``baseline`` + floor, floor = ``rounding_floor(ref, dtype)``
    (``dtype`` defaults to ``out.dtype``). Without it, max error <= ``atol``. NaN always fails.
    Returns the measured numbers.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
    dtype = dtype or out.dtype
    nan = int(torch.isnan(out.detach().cpu()).sum())
    max_err, rms_err = errors(ref, out)
    report = dict(name=name, max_err=max_err, rms_err=rms_err, nan=nan)
    if baseline is not None:
        floor = rounding_floor(ref.detach().cpu(), dtype)
        b_max, b_rms = errors(ref, baseline)
        max_bound, rms_bound = factor * b_max + floor, factor * b_rms + floor
        report.update(baseline_max=b_max, baseline_rms=b_rms, floor=floor)
    else:
        assert atol is not None, "assert_close needs baseline= or atol="
        max_bound, rms_bound = atol, math.inf
    report.update(max_bound=max_bound, rms_bound=rms_bound)
    print(f"{name}: max_err={max_err:.3e} (bound {max_bound:.3e}) "
          f"rms_err={rms_err:.3e} (bound {rms_bound:.3e}) nan={nan}")
    if nan or not (max_err <= max_bound and rms_err <= rms_bound):
        raise AssertionError(
            f"{name}: max_err={max_err:.3e} (bound {max_bound:.3e}), rms_err={rms_err:.3e} "
            f"(bound {rms_bound:.3e}), {nan} NaN")
    return report


def check_attention(name: str, inp: AttentionInputs, out: torch.Tensor,
                    oracle: torch.Tensor | None = None) -> dict:
    """Check an attention output of ``inp`` against the float64 oracle with the §5.5 bound."""
    dtype = inp.query.dtype
    if out.dtype != dtype:
        raise AssertionError(f"{name}: output dtype {out.dtype}, expected {dtype}")
    oracle = dense_attention(inp) if oracle is None else oracle
    baseline = dense_attention(inp, compute_dtype=dtype)
    return assert_close(name, oracle, out, baseline=baseline, dtype=dtype)


# Parity cases shared by tests/reference and tests/kernels (small: the interpreter is slow).
PARITY_CASES: tuple[AttentionCase, ...] = (
    AttentionCase("gqa1_mha", (7, 1, 20), (30, 12, 0), num_heads=4, num_kv_heads=4),
    AttentionCase("gqa4", (9, 1, 17), (25, 40, 3), num_heads=8, num_kv_heads=2, seed=1),
    AttentionCase("gqa8", (13, 1), (21, 34), num_heads=8, num_kv_heads=1, head_dim=16, seed=2),
    AttentionCase("heads6_kv2_d24", (11, 3), (19, 6), num_heads=6, num_kv_heads=2, head_dim=24,
                  seed=3),
    AttentionCase("heads5_kv1", (5, 1, 8), (10, 22, 0), num_heads=5, num_kv_heads=1,
                  head_dim=16, seed=4),
    AttentionCase("page1", (6, 1, 9), (11, 25, 0), block_size=1, spare_blocks=7, seed=5),
    AttentionCase("page5", (7, 1, 12), (13, 29, 2), block_size=5, seed=6),
    AttentionCase("page24", (9, 1, 30), (40, 23, 5), block_size=24, seed=7),
    AttentionCase("page64_partial", (5, 3), (70, 0), block_size=64, seed=8),
    AttentionCase("mixed_decode_prefill", (1, 1, 13, 0, 1, 9), (40, 3, 17, 5, 0, 0),
                  num_heads=8, num_kv_heads=2, block_size=16, seed=9),
    AttentionCase("long_prefix_odd", (33,), (71,), num_heads=4, num_kv_heads=1, block_size=16,
                  seed=10),
)
