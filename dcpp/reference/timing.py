"""Timed prefill passes on the reference model, for profiling without an engine.

``make_timed_forward`` returns a ``timed_forward(num_tokens, history) -> seconds`` callable (the
profiler's interface): it runs one chunk of ``num_tokens`` new tokens after ``history`` cached
tokens through every pipeline stage and returns the slowest stage's compute time, since the
slowest stage sets the pipeline's pace. The history's K/V are random (timing does not depend on
their values), so no pass over the history is needed. K/V are written in place, as an engine
does, and glibc is asked to keep freed memory (otherwise the attention's large temporaries are
returned to the OS and page-faulted back on every pass, which made pass times erratic).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable, Sequence

import torch

from dcpp.reference.model import ModelConfig, Params, embed
from dcpp.reference.pipeline import chunk_metadata, run_stage, split_layers


def keep_freed_memory() -> bool:
    """glibc only: raise the mmap and trim thresholds (mallopt); False where not available."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20)
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)
        ok &= libc.mallopt(m_top_pad, 256 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def make_timed_forward(
    params: Params,
    config: ModelConfig,
    *,
    num_stages: int = 1,
    partition: Sequence[int] | None = None,
    block_size: int = 16,
    max_model_len: int = 8192,
    seed: int = 0,
    num_threads: int | None = 1,
) -> Callable[[int, int], float]:
    """See the module docstring. Caches are sized for ``max_model_len`` tokens. Each pass runs
    with ``num_threads`` torch threads (restored afterwards; None keeps the current setting):
    one thread keeps timings repeatable when another process shares the cores."""
    keep_freed_memory()
    stages = split_layers(config.num_layers, num_stages, partition)
    num_blocks = -(-max_model_len // block_size)
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    caches = [[(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
               for _ in layers] for layers in stages]
    block_ids = torch.randperm(num_blocks, generator=g)
    dtype = params["model.embed_tokens.weight"].dtype

    def timed_forward(num_tokens: int, history: int) -> float:
        if num_tokens < 1 or history < 0 or num_tokens + history > max_model_len:
            raise ValueError(
                f"num_tokens={num_tokens}, history={history}: need num_tokens >= 1, "
                f"history >= 0 and num_tokens + history <= max_model_len={max_model_len}"
            )
        meta = chunk_metadata(block_ids, history, num_tokens, block_size)
        tokens = torch.randint(0, config.vocab_size, (num_tokens,), generator=g)
        x = embed(params, tokens).to(dtype)
        slowest = 0.0
        saved = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            for layers, stage_caches in zip(stages, caches):
                start = time.perf_counter()
                x, _ = run_stage(params, config, layers, x, stage_caches, meta, inplace=True)
                slowest = max(slowest, time.perf_counter() - start)
        finally:
            torch.set_num_threads(saved)
        return slowest

    return timed_forward
