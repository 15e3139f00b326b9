"""Pipeline-parallel chunked prefill over the reference model.

Layers are split into P stages. Stage p owns only its layers' paged KV caches; it consumes the
hidden states that stage p-1 hands off and hands its own on; the last stage produces logits.
A prompt is prefilled with a given list of chunk sizes; prefix-cache hits skip the cached tokens
on every stage. Every (chunk, stage) compute interval is timed so bubbles can be measured.

All stages share one block table (same block ids on every stage, one pool per layer), as in
vLLM, so one ``PrefixCache`` does the bookkeeping for the whole pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from dcpp.reference.kv_cache import slot_mapping_for
from dcpp.reference.model import (
    AttentionMetadata,
    ModelConfig,
    Params,
    check_tokens,
    embed,
    layer_forward_paged,
    lm_head,
)
from dcpp.reference.prefix_cache import PrefixCache

KVCache = tuple[torch.Tensor, torch.Tensor]  # 2 x [num_blocks, block_size, num_kv_heads, head_dim]
StageCaches = list[list[KVCache]]  # [stage][layer within stage]


def split_layers(num_layers: int, num_stages: int,
                 partition: Sequence[int] | None = None) -> list[range]:
    """Layer ranges per stage. Even split by default (earlier stages get the remainder);
    ``partition`` gives each stage's layer count explicitly."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r}; expected an int >= 1")
    if num_stages > num_layers:
        raise ValueError(f"num_stages={num_stages} exceeds num_layers={num_layers}; "
                         "every stage needs at least one layer")
    if partition is None:
        base, extra = divmod(num_layers, num_stages)
        partition = [base + (1 if s < extra else 0) for s in range(num_stages)]
    partition = list(partition)
    if len(partition) != num_stages or any(n < 1 for n in partition) or sum(partition) != num_layers:
        raise ValueError(
            f"partition={partition} must have num_stages={num_stages} entries, each >= 1, "
            f"summing to num_layers={num_layers}"
        )
    bounds = [0]
    for n in partition:
        bounds.append(bounds[-1] + n)
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def init_caches(config: ModelConfig, stages: Sequence[range], num_blocks: int, block_size: int,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                ) -> StageCaches:
    """Zeroed paged KV caches, one (key, value) pair per layer, grouped by stage."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [
        [(torch.zeros(shape, dtype=dtype, device=device),
          torch.zeros(shape, dtype=dtype, device=device)) for _ in layers]
        for layers in stages
    ]


@dataclass(frozen=True)
class PrefillResult:
    """What one pipelined prefill produced."""

    logits: torch.Tensor  # [num_tokens - num_cached_tokens, vocab] fp32, positions cached..T-1
    num_cached_tokens: int
    """Prompt tokens served from the prefix cache (skipped on every stage)."""
    block_ids: list[int]
    """Blocks holding the prompt; the caller frees them when the request ends."""
    chunks: list[int]
    """Chunk sizes actually executed (the plan with cached tokens removed)."""
    stage_times: list[list[float]]
    """Compute seconds, [chunk][stage]."""
    caches: StageCaches
    """The updated caches."""


def executed_chunks(chunk_sizes: Sequence[int], num_tokens: int, num_cached: int) -> list[int]:
    """The chunks to run: a plan summing to ``num_tokens`` loses its first ``num_cached`` tokens;
    a plan summing to ``num_tokens - num_cached`` runs as given."""
    sizes = [int(c) for c in chunk_sizes]
    if any(c <= 0 for c in sizes):
        raise ValueError(f"chunk_sizes={sizes} must all be positive")
    total = sum(sizes)
    if total == num_tokens - num_cached:
        return sizes
    if total != num_tokens:
        raise ValueError(
            f"chunk_sizes sum to {total}; expected the prompt length {num_tokens} or the "
            f"uncached length {num_tokens - num_cached}"
        )
    out, skip = [], num_cached
    for c in sizes:
        take = min(c, skip)
        skip -= take
        if c - take:
            out.append(c - take)
    return out


def chunk_metadata(block_ids: torch.Tensor, history: int, chunk: int,
                   block_size: int) -> AttentionMetadata:
    """Attention layout of one chunk of one sequence (built once, used by every layer/stage)."""
    device = block_ids.device
    return AttentionMetadata(
        positions=torch.arange(history, history + chunk, device=device),
        slot_mapping=slot_mapping_for(block_ids, history, history + chunk, block_size),
        block_table=block_ids.to(torch.int32)[None, :],
        query_start_loc=torch.tensor([0, chunk], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([history + chunk], dtype=torch.int32, device=device),
    )


def run_stage(params: Params, config: ModelConfig, layers: range, x: torch.Tensor,
              caches: list[KVCache], meta: AttentionMetadata, *, inplace: bool = False
              ) -> tuple[torch.Tensor, list[KVCache]]:
    """Run one stage's layers on a chunk. x: [chunk, hidden] -> [chunk, hidden]."""
    new_caches = []
    for layer, kv in zip(layers, caches):
        x, kv = layer_forward_paged(params, config, layer, x, kv, meta, inplace=inplace)
        new_caches.append(kv)
    return x, new_caches


def prefill(
    params: Params,
    config: ModelConfig,
    tokens: torch.Tensor,  # [T] int
    chunk_sizes: Sequence[int],
    *,
    stages: Sequence[range],
    caches: StageCaches,
    prefix_cache: PrefixCache | None = None,
) -> PrefillResult:
    """Prefill ``tokens`` chunk by chunk through the stages; see the module docstring."""
    check_tokens(config, tokens)
    if len(caches) != len(stages) or any(len(c) != len(s) for c, s in zip(caches, stages)):
        raise ValueError("caches must hold one (key, value) pair per layer of each stage; "
                         "build them with init_caches(config, stages, ...)")
    num_blocks, block_size = caches[0][0][0].shape[:2]
    if prefix_cache is None:
        prefix_cache = PrefixCache(num_blocks, block_size)
    token_list = tokens.tolist()
    num_cached, block_list = prefix_cache.allocate(token_list)
    chunks = executed_chunks(chunk_sizes, len(token_list), num_cached)
    block_ids = torch.tensor(block_list, dtype=torch.int64, device=tokens.device)

    caches = [list(c) for c in caches]
    logits, stage_times = [], []
    history = num_cached
    for chunk in chunks:
        meta = chunk_metadata(block_ids, history, chunk, block_size)
        times = []
        x = None
        for s, layers in enumerate(stages):
            start = time.perf_counter()
            # Stage 0 embeds the chunk's tokens; stage s > 0 consumes stage s-1's hand-off.
            x_in = embed(params, tokens[history : history + chunk]) if s == 0 else x
            x, caches[s] = run_stage(params, config, layers, x_in, caches[s], meta)
            if s == len(stages) - 1:
                logits.append(lm_head(params, config, x))
            times.append(time.perf_counter() - start)
        stage_times.append(times)
        history += chunk
        prefix_cache.cache_full_blocks(token_list, block_list, history)
    return PrefillResult(
        logits=torch.cat(logits) if logits else torch.empty(0, config.vocab_size),
        num_cached_tokens=num_cached,
        block_ids=block_list,
        chunks=chunks,
        stage_times=stage_times,
        caches=caches,
    )
