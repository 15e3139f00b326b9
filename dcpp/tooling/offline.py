"""Drive vLLM's own scheduler classes with no model (as vLLM's scheduler tests do).

`build_scheduler` makes a real `vllm` Scheduler (or dcpp's subclass) from a tiny local
checkpoint's config, a synthetic KV cache and no workers; `SyntheticExecutor` answers dcpp's
worker RPCs (start-up profiling, per-stage step timing) from a latency function, so dcpp
profiles and calibrates as in an engine. `fake_output` is the model runner's answer to a step
(one sampled token per request whose prompt is done). Used by the scheduler-level tests and
`benchmarks/scheduler_overhead.py`.
"""

from __future__ import annotations

from dcpp.online.stage_timing import step_is_timed

import itertools
from typing import Any, Callable

from dcpp.integration.vllm import vllm_compat

#: seconds(chunk, history) of one pipeline stage: 2 ms per step, attention grows with history.
LatencyFn = Callable[[int, int], float]


def synthetic_stage(chunk: int, history: int) -> float:
    return 2e-3 + 2e-6 * chunk + 4e-9 * chunk * history + 2e-9 * chunk * chunk


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


class SyntheticExecutor:
    """dcpp's worker RPCs answered from `fn` for `num_stages` stages; `run(step)` is a step's
    execution on every stage (recorded when that stage's timer samples it)."""

    def __init__(self, fn: LatencyFn = synthetic_stage, num_stages: int = 2) -> None:
        self.fn, self.num_stages = fn, num_stages
        self.timing_every: int | None = None
        """The workers' timing rate (None: no timer installed)."""
        self.records: list[list[tuple[int, float]]] = [[] for _ in range(num_stages)]
        self.steps_run = 0
        self.steps_timed = 0

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None, non_block: bool = False) -> Any:
        name = method if isinstance(method, str) else method.__name__
        ranks = range(self.num_stages)
        if name.endswith("timed_prefill"):
            n, h = int(args[0]), int(args[1])
            res = [{"pp_rank": r, "tp_rank": 0, "seconds": self.fn(n, h)} for r in ranks]
        elif name.endswith("enable_step_timing"):
            self.timing_every = int(args[0]) if args else 1
            res = [{"pp_rank": r, "tp_rank": 0, "ok": True} for r in ranks]
        elif name.endswith("drain_step_times"):
            res = [{"pp_rank": r, "tp_rank": 0, "times": self.records[r]} for r in ranks]
            self.records = [[] for _ in ranks]
            if args and args[0] is not None:  # the new timing rate rides on the drain
                self.timing_every = int(args[0])
        else:
            raise RuntimeError(f"SyntheticExecutor has no RPC {name!r}")
        return _Done(res) if non_block else res

    def run(self, scheduler: Any, scheduler_output: Any) -> None:
        """Every stage runs the step; the timer syncs and records it only when sampled."""
        if scheduler_output.total_num_scheduled_tokens <= 0:
            return
        self.steps_run += 1
        fp = vllm_compat.step_fingerprint(scheduler_output)
        if self.timing_every is None or not step_is_timed(fp, self.timing_every):
            return
        self.steps_timed += 1
        batch = [(r.tokens, r.history)
                 for r in vllm_compat.scheduled_step(scheduler, scheduler_output).requests]
        # Per-request work plus the step's fixed cost once (the form dcpp's model fits).
        fixed = self.fn(0, 0)
        secs = fixed + sum(self.fn(n, h) - fixed for n, h in batch)
        for r in range(self.num_stages):
            self.records[r].append((fp, secs))


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
