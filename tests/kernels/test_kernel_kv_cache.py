"""Triton write_kv vs the reference: bit-exact for every dtype, slot -1 skipped, strided caches."""

import pytest
import torch

from dcpp import kernels
from dcpp.reference.kv_cache import slot_mapping_for
from dcpp.reference.kv_cache import write_kv as reference_write_kv

pytestmark = pytest.mark.kernels


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 32), (1, 1, 16), (5, 3, 24)])
def test_write_kv_matches_reference(dtype, block_size, num_kv_heads, head_dim):
    g = torch.Generator().manual_seed(block_size)
    num_blocks = -(-17 // block_size) + 3  # 17 positions + spare blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan")).to(dtype)
    v_cache = torch.full(shape, float("nan")).to(dtype)
    # A 13-token chunk of a sequence at position 4, on permuted blocks; two tokens skipped.
    block_ids = torch.randperm(num_blocks, generator=g)
    slots = slot_mapping_for(block_ids, 4, 17, block_size)  # [13]
    slots[[2, 7]] = -1
    key = torch.randn(13, num_kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(13, num_kv_heads, head_dim, generator=g).to(dtype)
    ref_k, ref_v = reference_write_kv(key, value, k_cache, v_cache, slots)
    out_k, out_v = kernels.write_kv(key, value, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(_bits(ref_k), _bits(out_k)) and torch.equal(_bits(ref_v), _bits(out_v))
    assert torch.isnan(k_cache.float()).all(), "functional write_kv must not touch its inputs"
    # In place, int32 slots.
    kernels.write_kv_(key, value, k_cache, v_cache, slots.to(torch.int32), impl="triton")
    assert torch.equal(_bits(ref_k), _bits(k_cache)) and torch.equal(_bits(ref_v), _bits(v_cache))


def test_write_kv_strided_cache_and_validation():
    kv = torch.zeros(2, 4, 16, 2, 8)  # [2, num_blocks, block_size, kv_heads, head_dim]
    kv = kv.transpose(0, 1).contiguous().transpose(0, 1)  # block-major: strided views
    k_cache, v_cache = kv[0], kv[1]
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([63, -1, 17])
    kernels.write_kv_(key, value, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(k_cache[3, 15], key[0]) and torch.equal(v_cache[1, 1], value[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2
    for impl in ("reference", "triton"):
        with pytest.raises(ValueError, match="slot_mapping"):
            kernels.write_kv(key, value, k_cache, v_cache, torch.tensor([64, 0, 1]), impl=impl)
    with pytest.raises(ValueError, match="impl"):
        kernels.write_kv(key, value, k_cache, v_cache, slots, impl="fast")


def test_write_kv_rejects_mixed_devices():
    key = torch.randn(2, 1, 16)
    cache = torch.zeros(2, 2, 1, 16, device="meta")
    with pytest.raises(ValueError, match="key_cache is on meta; expected key's device cpu"):
        kernels.write_kv(key, key, cache, cache, torch.tensor([0, 1]), impl="triton")
