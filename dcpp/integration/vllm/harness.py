"""Start, drive and stop in-process vLLM engines for the demo and the TTFT benchmark.

The EngineCore runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so dcpp's scheduler
state (chunk log, step timings, fitted model) can be read; the PP workers are child processes,
reaped by PID on shutdown.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

from dcpp.integration.vllm import vllm_compat


def tiny_llama(path: str | Path, *, layers: int, hidden: int, max_len: int) -> Path:
    """A random-init Llama (head_dim 32, GQA 2:1), written once to ``path``."""
    from dcpp.reference.checkpoint import write_random_llama
    from dcpp.reference.model import ModelConfig

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    heads = max(2, hidden // 32)
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=32,
                      max_position_embeddings=max_len)
    return write_random_llama(path, config=cfg, seed=0)


def prompt_tokens(n: int, seed: int = 0) -> list[int]:
    """A fixed random prompt of ``n`` token ids (below the tiny model's vocab of 512)."""
    import torch

    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def static_chunks(prompt_len: int, budget: int) -> list[int]:
    """vLLM's own chunking of one prompt: full budgets, then the rest."""
    return [budget] * (prompt_len // budget) + ([prompt_len % budget] if prompt_len % budget else [])


def start_engine(model: str | Path, *, budget: int, max_model_len: int,
                 dcpp: dict | None = None, prefix_caching: bool = False,
                 pipeline_parallel_size: int = 2, dtype: str = "float32") -> Any:
    """``vllm.LLM`` with PP (default 2), chunked prefill, ``dtype`` (default fp32, "auto" for
    the checkpoint's); ``dcpp`` is the profiling_chunk_config block (None: plain vLLM)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    extra = {"additional_config": {"profiling_chunk_config": dcpp}} if dcpp is not None else {}
    return LLM(model=str(model), skip_tokenizer_init=True,
               pipeline_parallel_size=pipeline_parallel_size,
               enable_chunked_prefill=True, max_num_batched_tokens=budget,
               max_model_len=max_model_len, dtype=dtype,
               enable_prefix_caching=prefix_caching, seed=0, **extra)


def dcpp_runtime(llm: Any) -> Any:
    """dcpp's scheduler state, or None when dcpp is not active in this engine."""
    return getattr(vllm_compat.in_process_scheduler(llm), "dcpp", None)


def timed_generate(llm: Any, tokens: list[int], *, max_tokens: int = 1,
                   plan: str | None = None) -> tuple[float, list[int], str]:
    """Greedy generation of one prompt: (seconds, output token ids, request id). With
    ``max_tokens=1`` the seconds are the TTFT. ``plan`` picks dcpp's plan for this request."""
    from vllm import SamplingParams

    extra = {"extra_args": {"dcpp_plan": plan}} if plan is not None else {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True, **extra)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
    return time.perf_counter() - t0, list(out.outputs[0].token_ids), out.request_id


def chunks_of(rt: Any, request_id: str) -> list[int]:
    """Executed chunk sizes of a request (vLLM appends a suffix to request ids internally)."""
    for k, v in rt.chunk_log.items():
        if k == request_id or k.rsplit("-", 1)[0] == request_id:
            return list(v)
    return []


def shutdown(llm: Any, timeout: float = 20.0) -> None:
    """Shut the engine down and make sure its worker processes are gone (killed by PID)."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True)
    try:
        vllm_compat.shutdown_engine_core(llm)
    finally:
        gc.collect()
        procs = [p for p in procs if not _is_resource_tracker(p)]
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


def _is_resource_tracker(p: Any) -> bool:
    import psutil

    try:
        return any("resource_tracker" in part for part in p.cmdline())
    except psutil.Error:
        return True
