"""`SchedulerAdapter`: vLLM's scheduler events as the online core's plain values.

The scheduler mixin (`scheduler._DcppMixin`) calls one method per event; each reads what it
needs from vLLM through `vllm_compat` and hands plain values (`dcpp.online.engine`) to the
`DcppRuntime`. Tests drive the same adapter with stand-in scheduler objects.
"""

from __future__ import annotations

from typing import Any

from dcpp.integration.vllm import vllm_compat
from dcpp.online.runtime import DcppRuntime, logger


_FIND: Any = object()


def build_runtime(vllm_config: Any, executor: Any | None = _FIND) -> DcppRuntime | None:
    """Validate the config block, profile (or load the cached profile) and build the runtime;
    None when dcpp is off. Everything vLLM-specific the runtime needs is read here. `executor`:
    the engine's model executor (default: the EngineCore constructing the caller's)."""
    from dcpp.config import ProfilingChunkConfig
    from dcpp.integration.vllm.metrics import start_metrics
    from dcpp.integration.vllm.startup_profile import load_or_profile
    from dcpp.integration.vllm.worker_rpc import VllmWorkerChannel

    cfg = ProfilingChunkConfig.from_additional_config(_additional(vllm_config))
    if not cfg.enabled:
        logger.info("dcpp: scheduler loaded but profiling_chunk_config.enabled is false; "
                    "vLLM's own chunking is used")
        return None
    sched = vllm_config.scheduler_config
    cfg = cfg.check_engine(
        pipeline_parallel_size=int(vllm_config.parallel_config.pipeline_parallel_size),
        enable_chunked_prefill=bool(sched.enable_chunked_prefill),
        max_num_batched_tokens=int(sched.max_num_batched_tokens),
    )
    if executor is _FIND:
        executor = vllm_compat.find_engine_executor()
    profile = load_or_profile(vllm_config, cfg, executor)
    metrics = start_metrics(int(cfg.metrics_port),
                            rank=vllm_compat.data_parallel_rank(vllm_config))
    return DcppRuntime(cfg, vllm_compat.engine_limits(vllm_config), profile,
                       channel=VllmWorkerChannel(vllm_config, executor) if executor else None,
                       metrics=metrics)


def _additional(vllm_config: Any) -> dict | None:
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, dict) else None


class SchedulerAdapter:
    def __init__(self, runtime: DcppRuntime) -> None:
        self.runtime = runtime

    def begin_step(self, scheduler: Any) -> None:
        self.runtime.begin_step(*vllm_compat.step_room(scheduler))

    def abort_step(self) -> None:
        self.runtime.abort_step()

    def size(self, scheduler: Any, request: Any, history: int, offered: int) -> int:
        """dcpp's number of new tokens for `request` (vLLM offered `offered`)."""
        return self.runtime.cap(vllm_compat.offer(scheduler, request, int(history), int(offered)))

    def commit(self, request: Any, history: int, tokens: int) -> None:
        """vLLM took `tokens` of `request` (after its own checks of dcpp's number)."""
        self.runtime.commit(request.request_id, int(history), int(tokens))

    def preempted(self, request: Any) -> None:
        self.runtime.uncommit(request.request_id)

    def end_step(self, scheduler: Any, scheduler_output: Any) -> None:
        self.runtime.end_step(vllm_compat.scheduled_step(scheduler, scheduler_output))

    def on_output(self, scheduler_output: Any, t_out: float, idle: bool) -> None:
        self.runtime.on_output(vllm_compat.step_fingerprint(scheduler_output), t_out, idle)

    def freed(self, request: Any) -> None:
        self.runtime.free([request.request_id])
