"""Triton chunked-prefill attention vs the float64 dense oracle, on the shared parity cases
(dcpp.testing), under the interpreter. Bound: DESIGN.md §5.5."""

import pytest
import torch

from dcpp import kernels
from dcpp.kernels.attention import AttentionLaunchConfig, choose_tiling, launch_attention
from dcpp.reference.attention import chunked_prefill_attention as reference_attention
from dcpp.testing import (
    DTYPES, PARITY_CASES, AttentionCase, assert_close, check_attention, dense_attention,
    make_attention_inputs,
)

pytestmark = pytest.mark.kernels
dtype_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_kernel_matches_dense_oracle(case, dtype):
    inp = make_attention_inputs(case, dtype)
    out = kernels.chunked_prefill_attention(*inp.args(), impl="triton")
    check_attention(f"triton[{case.name},{dtype_id(dtype)}]", inp, out)
    ref = reference_attention(*inp.args())
    # Under the interpreter the kernel computes in fp32 like the reference.
    assert_close(f"triton_vs_reference[{case.name},{dtype_id(dtype)}]", ref.double(), out,
                 atol=2e-6 if dtype == torch.float32 else 2 * float(torch.finfo(dtype).eps))


# Small tiles: many query tiles and KV tiles, so the unmasked-prefix / masked-diagonal split,
# tiles that slice one page (page 32, BLOCK_N 16) and multi-page tiles are all exercised.
SMALL = AttentionLaunchConfig(block_m=16, block_n=16)
TILE_CASES = (
    AttentionCase("slice_page32", (21, 1, 6), (45, 70, 0), num_heads=4, num_kv_heads=2,
                  block_size=32, seed=21),
    AttentionCase("multipage5", (19, 2), (37, 3), num_heads=6, num_kv_heads=3, block_size=5,
                  seed=22),
    AttentionCase("page1_gqa8", (9, 1), (20, 15), num_heads=8, num_kv_heads=1, head_dim=16,
                  block_size=1, seed=23),
)


@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: c.name)
def test_small_tiles(case):
    inp = make_attention_inputs(case, torch.float32)
    q_lens = list(case.query_lens)
    out = launch_attention(*inp.args(), q_lens, list(case.seq_lens), config=SMALL)
    check_attention(f"triton_small_tiles[{case.name}]", inp, out)


def test_tiling_rules():
    cfg = AttentionLaunchConfig(block_m=128, block_n=64)
    t = choose_tiling(32, 8, 128, 16, 4096, cfg)
    assert (t.group_pad, t.block_q, t.block_m, t.block_n, t.paged_tile) == (4, 32, 128, 16, True)
    t = choose_tiling(32, 8, 128, 128, 4096, cfg)
    assert (t.block_n, t.paged_tile) == (64, True)  # two tiles per page, one block id each
    t = choose_tiling(12, 4, 96, 24, 1, cfg)  # decode-only, group 3, page 24, head_dim 96
    assert (t.group_pad, t.block_q, t.block_m, t.block_n, t.block_d, t.paged_tile) == (
        4, 4, 16, 64, 128, False)
    t = choose_tiling(256, 1, 64, 1, 100, cfg)  # group 256 > block_m: one token per tile
    assert t.block_q == 1 and t.block_m == 256


def test_random_batches():
    # A few random batches (seeded, no hypothesis: the interpreter is slow).
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        n = int(torch.randint(1, 4, (1,), generator=g))
        q_lens = tuple(int(x) for x in torch.randint(0, 12, (n,), generator=g))
        ctx = tuple(int(x) for x in torch.randint(0, 40, (n,), generator=g))
        kv = int(torch.randint(1, 3, (1,), generator=g))
        group = int(torch.randint(1, 4, (1,), generator=g))
        bs = [1, 3, 16, 32][int(torch.randint(0, 4, (1,), generator=g))]
        case = AttentionCase(f"random{trial}", q_lens, ctx, num_heads=kv * group,
                             num_kv_heads=kv, head_dim=16, block_size=bs, seed=100 + trial)
        if sum(q_lens) == 0:
            continue
        inp = make_attention_inputs(case, torch.float16)
        out = kernels.chunked_prefill_attention(*inp.args(), impl="triton")
        check_attention(f"triton_random[{case}]", inp, out)


def test_scale_and_noncontiguous_cache():
    # Caches as views into one [2, num_blocks, ...] tensor (vLLM's layout); explicit scale.
    case = AttentionCase("kv_view", (7, 3), (18, 0), num_heads=4, num_kv_heads=2, seed=31)
    inp = make_attention_inputs(case)
    kv = torch.stack([inp.key_cache, inp.value_cache])  # [2, num_blocks, bs, kv_heads, d]
    inp.key_cache, inp.value_cache = kv[0], kv[1]
    kv_t = kv.transpose(0, 1).contiguous().transpose(0, 1)  # block-major: non-contiguous views
    inp.key_cache, inp.value_cache = kv_t[0], kv_t[1]
    assert not inp.key_cache.is_contiguous()
    inp.scale = 0.21
    out = kernels.chunked_prefill_attention(*inp.args(), scale=0.21, impl="triton")
    assert_close("triton_kv_view_scale", dense_attention(inp), out, atol=2e-6)


def test_empty_batch():
    case = AttentionCase("empty", (0, 0), (3, 0))
    inp = make_attention_inputs(case)
    out = kernels.chunked_prefill_attention(*inp.args(), impl="triton")
    assert out.shape == (0, 4, 32)


def test_dispatch(monkeypatch):
    case = AttentionCase("dispatch", (3,), (2,), num_heads=2, num_kv_heads=1, head_dim=16)
    inp = make_attention_inputs(case)
    with pytest.raises(ValueError, match="impl"):
        kernels.chunked_prefill_attention(*inp.args(), impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.resolve_impl("auto", torch.device("cpu")) == "reference"
    assert kernels.resolve_impl("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_impl("auto", torch.device("cpu")) == "triton"
    a = kernels.chunked_prefill_attention(*inp.args(), impl="reference")
    b = kernels.chunked_prefill_attention(*inp.args(), impl="auto")
    assert_close("dispatch_auto_vs_reference", a.double(), b, atol=2e-6)


def test_same_validation_as_reference():
    case = AttentionCase("bad", (4,), (3,), num_heads=4, num_kv_heads=2)
    inp = make_attention_inputs(case)
    bad_sl = torch.tensor([2], dtype=torch.int32)  # query_len 4 > seq_len 2
    args = (inp.query, inp.key_cache, inp.value_cache, inp.block_table, inp.query_start_loc)
    for impl in ("reference", "triton"):
        with pytest.raises(ValueError, match="exceeds seq_len"):
            kernels.chunked_prefill_attention(*args, bad_sl, impl=impl)
        with pytest.raises(ValueError, match="num_heads"):
            kernels.chunked_prefill_attention(inp.query[:, :3], *args[1:], inp.seq_lens,
                                              impl=impl)
