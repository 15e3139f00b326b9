"""Reference chunked-prefill attention vs an independent dense oracle (SDPA in float64 on
gathered K/V with an explicit mask). Cases and bounds: dcpp.testing (DESIGN.md §5.5, §5.6)."""

import pytest
import torch

from dcpp.reference.attention import chunked_prefill_attention
from dcpp.testing import (
    DTYPES, PARITY_CASES, AttentionCase, assert_close, check_attention, dense_attention,
    make_attention_inputs,
)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.name)
def test_reference_matches_dense_oracle(case, dtype):
    inp = make_attention_inputs(case, dtype)
    out = chunked_prefill_attention(*inp.args())  # [num_tokens, num_heads, head_dim]
    assert out.shape == inp.query.shape and out.dtype == dtype
    check_attention(f"reference[{case.name},{dtype}]", inp, out)


def test_reference_fp32_is_tight():
    # fp32 math throughout: the error is fp32 noise, far below any low-precision bound.
    for case in PARITY_CASES:
        inp = make_attention_inputs(case, torch.float32)
        out = chunked_prefill_attention(*inp.args())
        assert_close(f"reference_fp32[{case.name}]", dense_attention(inp), out, atol=5e-6)


def test_explicit_scale_and_cache_untouched():
    case = AttentionCase("scale", (5, 2), (7, 0), num_heads=4, num_kv_heads=2, block_size=5)
    inp = make_attention_inputs(case)
    kc, vc = inp.key_cache.clone(), inp.value_cache.clone()
    inp.scale = 0.3
    out = chunked_prefill_attention(*inp.args(), scale=0.3)
    assert_close("reference_scale0.3", dense_attention(inp), out, atol=5e-6)
    assert torch.equal(kc.nan_to_num(7.0), inp.key_cache.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), inp.value_cache.nan_to_num(7.0))


def test_chunked_equals_unchunked():
    # DESIGN.md §5.8: attending chunk by chunk equals one monolithic prefill.
    full = AttentionCase("full", (29,), (0,), num_heads=4, num_kv_heads=2, block_size=5, seed=11)
    inp = make_attention_inputs(full)
    whole = chunked_prefill_attention(*inp.args())  # [29, H, D]
    pieces, done = [], 0
    for chunk in (8, 1, 13, 7):
        q = inp.query[done : done + chunk]
        qsl = torch.tensor([0, chunk], dtype=torch.int32)
        sl = torch.tensor([done + chunk], dtype=torch.int32)
        pieces.append(chunked_prefill_attention(q, inp.key_cache, inp.value_cache,
                                                inp.block_table, qsl, sl))
        done += chunk
    assert_close("chunked_vs_unchunked", whole, torch.cat(pieces), atol=1e-6)
