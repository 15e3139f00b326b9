"""Compiled kernels on a CUDA device (marked gpu; skipped without one)."""

import pytest
import torch

from dcpp import kernels
from dcpp.testing import (
    DTYPES, PARITY_CASES, AttentionCase, assert_close, check_attention, make_attention_inputs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
dtype_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_cuda_parity(case, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = make_attention_inputs(case, dtype, device="cuda")
    out = kernels.chunked_prefill_attention(*inp.args(), impl="triton")
    check_attention(f"cuda[{case.name},{dtype_id(dtype)}]", inp, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("block_size", [16, 128, 24])
def test_cuda_realistic_chunk(dtype, block_size, monkeypatch):
    # GQA 32/8, head_dim 128, a long-prefix chunk beside decodes.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = AttentionCase(f"real_p{block_size}", (700, 1, 1, 129), (1500, 900, 3, 0),
                         num_heads=32, num_kv_heads=8, head_dim=128, block_size=block_size,
                         spare_blocks=5, seed=7)
    inp = make_attention_inputs(case, dtype, device="cuda")
    out = kernels.chunked_prefill_attention(*inp.args(), impl="triton")
    check_attention(f"cuda_real[p{block_size},{dtype_id(dtype)}]", inp, out)


def test_cuda_large_block_count_index_overflow(monkeypatch):
    # block_id * stride_kb > 2**31 elements: offsets must be computed in int64.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    small = AttentionCase("overflow", (37, 1), (90, 40), num_heads=16, num_kv_heads=8,
                          head_dim=128, block_size=16, spare_blocks=2, seed=5)
    inp = make_attention_inputs(small, torch.bfloat16, device="cuda")
    per_block = 16 * 8 * 128
    num_blocks = (2**31) // per_block + 64  # ~4.3 GB per bf16 cache
    try:
        big_k = torch.full((num_blocks, 16, 8, 128), float("nan"), dtype=torch.bfloat16,
                           device="cuda")
        big_v = torch.full_like(big_k, float("nan"))
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for the overflow case")
    # Move every small block b to big block num_blocks - 1 - b.
    n_small = inp.key_cache.shape[0]
    dst = torch.arange(num_blocks - 1, num_blocks - 1 - n_small, -1, device="cuda")
    big_k[dst] = inp.key_cache
    big_v[dst] = inp.value_cache
    big_table = dst[inp.block_table.long()].to(torch.int32)
    out_big = kernels.chunked_prefill_attention(inp.query, big_k, big_v, big_table,
                                                inp.query_start_loc, inp.seq_lens,
                                                impl="triton")
    check_attention("cuda_overflow", inp, out_big)
    # write_kv into the far end of the big cache (slot * stride > 2**31 too).
    key = torch.randn(3, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([num_blocks * 16 - 1, -1, (num_blocks - 2) * 16 + 3], device="cuda")
    kernels.write_kv_(key, key, big_k, big_v, slots, impl="triton")
    assert torch.equal(big_k[num_blocks - 1, 15], key[0])
    assert torch.equal(big_v[num_blocks - 2, 3], key[2])
    del big_k, big_v
    torch.cuda.empty_cache()


def test_cuda_write_kv_matches_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in DTYPES:
        k_cache = torch.full((40, 16, 8, 128), float("nan"), dtype=dtype, device="cuda")
        v_cache = k_cache.clone()
        key = torch.randn(300, 8, 128, device="cuda").to(dtype)
        slots = torch.randperm(640, device="cuda")[:300]
        slots[::7] = -1
        a = kernels.write_kv(key, key, k_cache, v_cache, slots, impl="reference")
        b = kernels.write_kv(key, key, k_cache, v_cache, slots, impl="triton")
        assert torch.equal(a[0].nan_to_num(3.0), b[0].nan_to_num(3.0))
        assert_close(f"cuda_write_kv[{dtype_id(dtype)}]", a[1].nan_to_num(0).double(),
                     b[1].nan_to_num(0), atol=0.0)
