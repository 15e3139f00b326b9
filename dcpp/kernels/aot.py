"""Ahead-of-time compilation of the kernels without hardware (compile-only checks).

``compile_attention(target, ...)`` / ``compile_write_kv(target, ...)`` build a ``triton.compile``
call for a ``GPUTarget`` (e.g. ``GPUTarget("cuda", 90, 32)`` for H100 with upstream Triton, or
``GPUTarget("npu", "Ascend910B3", 0)`` with triton-ascend), handling the two ``ASTSource``
conventions (upstream >= 3.3: constexprs listed in the signature; triton-ascend 3.2: separate
``constants``).
"""

from __future__ import annotations

import inspect

import torch

from dcpp.kernels._loader import load_kernels, triton_mode

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
       torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


def _ast_source(fn, signature: dict, constexprs: dict):
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # upstream Triton >= 3.3
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        sig = {name: sig[name] for name in fn.arg_names}
        return ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    sig = {name: signature[name] for name in fn.arg_names if name in signature}
    return ASTSource(fn=fn, signature=sig, constants=constexprs)


def attention_source(dtype: torch.dtype, *, head_dim: int = 128, block_size: int = 16,
                     group: int = 4, block_q: int = 32, block_n: int = 16,
                     paged_tile: bool | None = None, compute_fp32: bool | None = None):
    """ASTSource of ``chunked_prefill_attention_kernel`` for one specialisation."""
    fn = load_kernels(False).chunked_prefill_attention_kernel
    t = _TY[dtype]
    group_pad = 1 << (group - 1).bit_length()
    if paged_tile is None:
        paged_tile = block_size & (block_size - 1) == 0 and block_size % block_n == 0
    if compute_fp32 is None:
        compute_fp32 = dtype == torch.float32
    signature = {
        "out_ptr": f"*{t}", "q_ptr": f"*{t}", "k_cache_ptr": f"*{t}", "v_cache_ptr": f"*{t}",
        "block_table_ptr": "*i32", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32",
        "work_ptr": "*i32", "num_items": "i32", "num_kv_heads": "i32",
        **{name: "i32" for name in (
            "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks",
            "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_bt")},
        "scale_log2e": "fp32",
    }
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=block_q, BLOCK_M=block_q * group_pad, BLOCK_N=block_n,
        BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), PAGED_TILE=paged_tile,
        COMPUTE_FP32=compute_fp32,
    )
    return _ast_source(fn, signature, constexprs)


def write_kv_source(dtype: torch.dtype, *, num_kv_heads: int = 8, head_dim: int = 128,
                    block_size: int = 16):
    """ASTSource of ``write_kv_kernel`` (a bit copy: float dtypes map to same-width ints)."""
    fn = load_kernels(False).write_kv_kernel
    it = {2: "i16", 4: "i32", 8: "i64"}[torch.empty((), dtype=dtype).element_size()]
    signature = {
        "key_ptr": f"*{it}", "value_ptr": f"*{it}", "k_cache_ptr": f"*{it}",
        "v_cache_ptr": f"*{it}", "slot_mapping_ptr": "*i64", "num_tokens": "i32",
        "num_kv_heads": "i32",
        **{name: "i32" for name in (
            "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kcb", "stride_kcs",
            "stride_kch", "stride_vcb", "stride_vcs", "stride_vch")},
    }
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                      BLOCK_H=1 << (num_kv_heads - 1).bit_length(),
                      BLOCK_D=1 << (head_dim - 1).bit_length())
    return _ast_source(fn, signature, constexprs)


def compile_source(src, target, options: dict | None = None):
    """``triton.compile`` for an explicit target (no device needed up to the binary step)."""
    import triton

    with triton_mode(False):  # code generation misbehaves if TRITON_INTERPRET=1 is set
        return triton.compile(src, target=target, options=options or {})


def compile_specs(target_name: str, specs: list[dict]) -> list[dict]:
    """Compile each spec ({"kernel": "attention"|"write_kv", "dtype": "bf16", **kwargs}) for
    "cuda90" or "ascend910b3"; return per spec: ok, error, cubin_bytes, wgmma, ttadapter text.

    Run it in a fresh process without ``TRITON_INTERPRET`` (``python -m dcpp.kernels.aot``):
    once ``triton.language`` has been imported in interpreter mode its own library functions are
    interpreted and code generation fails.
    """
    import glob
    import os
    import tempfile

    from triton.backends.compiler import GPUTarget

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if target_name == "cuda90":
        target = GPUTarget("cuda", 90, 32)
    elif target_name == "ascend910b3":
        target = GPUTarget("npu", "Ascend910B3", 0)
    else:
        raise ValueError(f"target {target_name!r}; expected 'cuda90' or 'ascend910b3'")
    results = []
    for spec in specs:
        spec = dict(spec)
        kernel, dtype, options = spec.pop("kernel"), dtypes[spec.pop("dtype")], spec.pop(
            "options", {})
        make = attention_source if kernel == "attention" else write_kv_source
        res = dict(ok=False, error="", cubin_bytes=0, wgmma=False, ttadapter=None)
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            try:
                compiled = compile_source(make(dtype, **spec), target, options)
                res["ok"] = True
                asm = compiled.asm
                res["cubin_bytes"] = len(asm.get("cubin", b""))
                res["wgmma"] = "wgmma" in asm.get("ptx", "")
            except Exception as e:  # triton-ascend stops at the binary step without CANN
                res["error"] = str(e)[-4000:]
            found = glob.glob(os.path.join(cache, "**", "*.ttadapter"), recursive=True)
            if found:
                with open(found[0]) as f:
                    res["ttadapter"] = f.read()
        results.append(res)
    return results


def compile_in_subprocess(target_name: str, specs: list[dict], timeout: float = 300
                          ) -> list[dict]:
    """``compile_specs`` in a fresh interpreter with ``TRITON_INTERPRET`` unset."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "dcpp.kernels.aot", target_name, json.dumps(specs)],
        env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(compile_specs(sys.argv[1], json.loads(sys.argv[2]))))
