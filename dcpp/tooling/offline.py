"""Drive vLLM's own scheduler classes with no model (as vLLM's scheduler tests do).

`build_scheduler` makes a real `vllm` Scheduler (or dcpp's subclass) from a tiny local
checkpoint's config, a synthetic KV cache and no workers; `SyntheticExecutor` answers dcpp's
worker RPCs (start-up profiling, per-stage step timing) from a latency function, so dcpp
profiles and calibrates as in an engine. `fake_output` is the model runner's answer to a step
(one sampled token per request whose prompt is done). Used by the scheduler-level tests and
`benchmarks/scheduler_overhead.py`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from dcpp.integration.vllm import vllm_compat
from dcpp.online.stage_timing import step_is_timed
from dcpp.tooling.fake_engine import FakeExecutor, true_time

#: seconds(chunk, history) of one pipeline stage (default `fake_engine.true_time`: 2 ms per
#: step, attention grows with history).
LatencyFn = Callable[[int, int], float]


class SyntheticExecutor(FakeExecutor):
    """`FakeExecutor`'s worker RPCs (the same profiling and step-timing answers) on
    `num_stages` identical stages of `fn`, with the workers' step timers fed by vLLM's real
    scheduler outputs: `run(scheduler, output)` is a step's execution on every stage, recorded
    when the stages' timer samples it."""

    def __init__(self, fn: LatencyFn = true_time, num_stages: int = 2) -> None:
        super().__init__(fn, step_timing=True, num_stages=num_stages,
                         stage_scale=(1.0,) * num_stages)
        self.every: int | None = None  # no timer installed until enable_step_timing
        self.steps_run = 0

    @property
    def timing_every(self) -> int | None:
        """The workers' timing rate (None: no timer installed)."""
        return self.every

    @property
    def steps_timed(self) -> int:
        return self.synced

    def run(self, scheduler: Any, scheduler_output: Any) -> None:
        """Every stage runs the step; the timer syncs and records it only when sampled."""
        if scheduler_output.total_num_scheduled_tokens <= 0:
            return
        self.steps_run += 1
        fp = vllm_compat.step_fingerprint(scheduler_output)
        if self.every is None or not step_is_timed(fp, self.every):
            return
        self.synced += 1
        batch = [(r.tokens, r.history)
                 for r in vllm_compat.scheduled_step(scheduler, scheduler_output).requests]
        # Per-request work plus the step's fixed cost once (the form dcpp's model fits).
        fixed = self.fn(0, 0)
        secs = fixed + sum(self.fn(n, h) - fixed for n, h in batch)
        self.queued.append((fp, [secs] * self.num_stages))


class _EngineStandIn:
    """What `vllm_compat.find_engine_executor` finds up the stack while a scheduler is built."""

    def __init__(self, executor: Any) -> None:
        self.model_executor = executor

    def build(self, cls: type, **kwargs: Any) -> Any:
        return cls(**kwargs)


def build_scheduler(cls: type, model_dir: str, *, budget: int, max_model_len: int,
                    num_blocks: int = 20000, block_size: int = 16, max_num_seqs: int = 256,
                    pipeline_parallel_size: int = 2, dcpp: dict | None = None,
                    policy: str = "fcfs", enable_prefix_caching: bool = False,
                    executor: Any | None = None) -> Any:
    """A `cls` scheduler (vLLM's or dcpp's) over a synthetic KV cache of `num_blocks`."""
    import torch
    from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,
                             SchedulerConfig, VllmConfig)
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec)
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=str(model_dir), skip_tokenizer_init=True,
                               max_model_len=max_model_len, dtype="float32", seed=0)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
        enable_chunked_prefill=True, is_encoder_decoder=False, policy=policy)
    cache_config = CacheConfig(block_size=block_size, cache_dtype="auto",
                               enable_prefix_caching=enable_prefix_caching)
    parallel_config = ParallelConfig(pipeline_parallel_size=pipeline_parallel_size,
                                     distributed_executor_backend="mp")
    extra = {"profiling_chunk_config": dcpp} if dcpp is not None else {}
    # No model runs: "cpu" spares the platform lookup, which finds no platform for a CUDA
    # wheel on a machine without a GPU (the 0.33 scheduler-only venv).
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                             cache_config=cache_config, parallel_config=parallel_config,
                             device_config=DeviceConfig(device="cpu"), additional_config=extra)
    cache_config.num_gpu_blocks = num_blocks
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=32, dtype=torch.float32))])
    return _EngineStandIn(executor).build(
        cls, vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size, log_stats=False)


_ids = itertools.count()


def make_request(prompt_len: int, *, max_tokens: int = 4, priority: int = 0,
                 plan: str | None = None, arrival_time: float | None = None,
                 seed: int = 0, request_id: str | None = None,
                 chunk_size: Any = None) -> Any:
    import random

    from vllm import SamplingParams
    from vllm.v1.request import Request

    rng = random.Random(seed)
    extra = {k: v for k, v in (("dcpp_plan", plan), ("dcpp_chunk_size", chunk_size))
             if v is not None} or None
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    return Request(request_id=request_id or f"req-{next(_ids)}",
                   prompt_token_ids=[rng.randrange(1, 500) for _ in range(prompt_len)],
                   sampling_params=params, pooling_params=None, priority=priority,
                   arrival_time=arrival_time)


def fake_output(scheduler: Any, scheduler_output: Any) -> Any:
    """The model runner's output for a step: token 7 for every request whose prompt is done."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        req = scheduler.requests[rid]
        sampled.append([7] if req.num_computed_tokens >= req.num_tokens else [])
    return ModelRunnerOutput(req_ids=req_ids,
                             req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled, logprobs=None,
                             prompt_logprobs_dict={}, pooler_output=[])
