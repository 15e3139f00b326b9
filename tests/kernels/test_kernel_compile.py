"""Compile-only checks without hardware (each target compiled once, in a subprocess without
TRITON_INTERPRET: see dcpp.kernels.aot.compile_specs).

- Upstream Triton: the kernels compile for H100 (``GPUTarget("cuda", 90, 32)``) to a cubin, with
  Hopper wgmma for 16-bit dots.
- triton-ascend: they lower to Linalg (``.ttadapter``; the binary step needs the CANN toolkit and
  fails here), and on the paged-tile path every K/V page load in the inner loops is one block copy
  (``memref.copy`` of a [BLOCK_N, head_dim] tile), never a per-element scalar loop
  (``DiscreteMemAccess`` / a nested ``scf.for``): a guard against NPU-hostile access.
"""

import importlib.util
import re

import pytest

from dcpp.kernels.aot import compile_in_subprocess

IS_ASCEND = importlib.util.find_spec("triton.backends.ascend") is not None
HAS_NVIDIA = importlib.util.find_spec("triton.backends.nvidia") is not None

CUDA_SPECS = {
    # paged tile = one 16-token page
    "bf16_p16": dict(kernel="attention", dtype="bf16", head_dim=128, block_size=16, group=4,
                     block_q=32, block_n=16, options=dict(num_warps=8, num_stages=3)),
    # two tiles per 128-token page
    "fp16_p128": dict(kernel="attention", dtype="fp16", head_dim=128, block_size=128, group=8,
                      block_q=16, block_n=64, options=dict(num_warps=8, num_stages=3)),
    # fp32 with ieee dot
    "fp32_p16": dict(kernel="attention", dtype="fp32", head_dim=64, block_size=16, group=1,
                     block_q=64, block_n=16, options=dict(num_warps=4, num_stages=2)),
    # non-power-of-2 page and head_dim: multi-page tiles
    "bf16_p5_d96": dict(kernel="attention", dtype="bf16", head_dim=96, block_size=5, group=4,
                        block_q=32, block_n=32, options=dict(num_warps=8, num_stages=3)),
    "write_kv_bf16": dict(kernel="write_kv", dtype="bf16", num_kv_heads=8, head_dim=128),
}
ASCEND_SPECS = {
    "bf16_p128": dict(kernel="attention", dtype="bf16", head_dim=128, block_size=128, group=4,
                      block_q=32, block_n=128),
    "fp16_p128_n64": dict(kernel="attention", dtype="fp16", head_dim=128, block_size=128,
                          group=8, block_q=16, block_n=64),
    "fp32_p16": dict(kernel="attention", dtype="fp32", head_dim=128, block_size=16, group=1,
                     block_q=16, block_n=16),
    "write_kv_bf16": dict(kernel="write_kv", dtype="bf16", num_kv_heads=8, head_dim=128),
}


@pytest.fixture(scope="module")
def cuda_results():
    return dict(zip(CUDA_SPECS, compile_in_subprocess("cuda90", list(CUDA_SPECS.values()))))


@pytest.fixture(scope="module")
def ascend_results():
    return dict(zip(ASCEND_SPECS, compile_in_subprocess("ascend910b3",
                                                        list(ASCEND_SPECS.values()))))


@pytest.mark.kernels
@pytest.mark.skipif(IS_ASCEND or not HAS_NVIDIA, reason="needs upstream Triton's NVIDIA backend")
@pytest.mark.parametrize("name", list(CUDA_SPECS))
def test_cuda_sm90_compiles_to_cubin(name, cuda_results):
    res = cuda_results[name]
    assert res["ok"], res["error"]
    assert res["cubin_bytes"] > 0
    if CUDA_SPECS[name]["kernel"] == "attention" and CUDA_SPECS[name]["dtype"] != "fp32":
        assert res["wgmma"], "expected Hopper wgmma for 16-bit dots"


def _loop_bodies(text: str) -> list[str]:
    """Bodies of the `scf.for ... iter_args` loops (the KV loops carrying acc, m_i, l_i)."""
    bodies = []
    for m in re.finditer(r"scf\.for [^\n]*iter_args[^\n]*\{\n", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        bodies.append(text[m.end() : i])
    return bodies


def _ttadapter(res) -> str:
    assert "ConvertTritonIRToLinalgIR" not in res["error"], res["error"]
    assert res["ttadapter"], f"no .ttadapter produced: {res['error']}"
    return res["ttadapter"]


@pytest.mark.ascend
@pytest.mark.skipif(not IS_ASCEND, reason="needs triton-ascend (make test-ascend)")
@pytest.mark.parametrize("name", [n for n in ASCEND_SPECS if n.startswith(("bf16", "fp"))])
def test_ascend_kv_loads_are_block_copies(name, ascend_results):
    spec = ASCEND_SPECS[name]
    text = _ttadapter(ascend_results[name])
    assert "DiscreteMemAccess" not in text, "per-element (discrete) memory access in the kernel"
    loops = _loop_bodies(text)
    assert len(loops) == 2, "expected two KV loops (unmasked prefix, masked diagonal)"
    tile = re.compile(rf"memref\.copy [^\n]*memref<(\?|{spec['block_n']})x{spec['head_dim']}x")
    for body in loops:
        assert "scf.for" not in body, "nested loop inside the KV loop (scalar access?)"
        assert len(tile.findall(body)) == 2, "K and V must each be one block copy per tile"
        assert "linalg.matmul" in body


@pytest.mark.ascend
@pytest.mark.skipif(not IS_ASCEND, reason="needs triton-ascend (make test-ascend)")
def test_ascend_write_kv_is_block_copy(ascend_results):
    text = _ttadapter(ascend_results["write_kv_bf16"])
    assert "DiscreteMemAccess" not in text
    assert text.count("scf.for") == 1  # the persistent token loop only
    assert len(re.findall(r"memref\.copy [^\n]*xi16", text)) == 2  # key and value rows
