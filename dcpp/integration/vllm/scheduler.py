"""vLLM scheduler subclasses that size every prefill chunk with dcpp (the thin mixin).

`DcppScheduler` (sync; what PP on CPU and most PP set-ups use) and `DcppAsyncScheduler` (async
scheduling) add `_DcppMixin` to vLLM's own classes. The mixin does not re-implement
`schedule()`: vLLM keeps deciding which requests run; dcpp only sizes a prefill request's chunk
through vLLM's per-request hook (see `vllm_compat`), within [1, vLLM's number]. Everything else
is `runtime.DcppRuntime` and its parts (docs/architecture.md).
"""

from __future__ import annotations

import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from dcpp.integration.vllm import vllm_compat
from dcpp.integration.vllm.chunk_sizer import PLAN_MODES, PLAN_OFF  # noqa: F401 - re-exported
from dcpp.integration.vllm.runtime import DcppRuntime, logger


def build_runtime(vllm_config: Any) -> DcppRuntime | None:
    """Validate the config block and build the runtime; None when dcpp is off."""
    from dcpp.config import ProfilingChunkConfig

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
    return DcppRuntime(vllm_config, cfg, executor=vllm_compat.find_engine_executor())


def _additional(vllm_config: Any) -> dict | None:
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, dict) else None


class _DcppMixin:
    """Adds dcpp's chunk sizing to a vLLM scheduler class."""

    dcpp: DcppRuntime | None = None
    """None: dcpp off (also for a scheduler built without __init__, as vLLM's tests do)."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        vllm_compat.check_scheduler_hook(type(self))
        self.dcpp = build_runtime(vllm_config)

    def schedule(self, *args: Any, **kwargs: Any):
        rt = self.dcpp
        if rt is None:
            return super().schedule(*args, **kwargs)
        rt.begin_step(self)
        try:
            out = super().schedule(*args, **kwargs)
        except BaseException:
            rt.abort_step()
            raise
        rt.end_step(self, out)
        return out

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        rt = self.dcpp
        if rt is None or num_new_tokens <= 1:
            return super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                      num_new_tokens)
        sized = rt.cap(self, request, int(num_computed_tokens), int(num_new_tokens))
        got = super()._reserve_prefill_lookahead(request, num_computed_tokens, sized)
        if got == 0 and sized != num_new_tokens:  # dcpp's cut fell in vLLM's lookahead window
            got = super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                     num_new_tokens)
        return got

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any):
        rt = self.dcpp
        t_out = time.monotonic() if rt is not None else 0.0
        result = super().update_from_output(scheduler_output, model_runner_output)
        if rt is not None:
            rt.on_output(scheduler_output, t_out, idle=not self.has_unfinished_requests())
            if rt.plans:
                rt.forget([rid for rid in rt.plans
                           if vllm_compat.live_request(self, rid) is None])
        return result

    def finish_requests(self, request_ids: Any, finished_status: Any):
        if request_ids is not None and not isinstance(request_ids, str):
            request_ids = list(request_ids)  # read twice below
        result = super().finish_requests(request_ids, finished_status)
        rt = self.dcpp
        if rt is not None:
            # Aborted (or stopped) requests: drop their plans and prefill timers.
            if request_ids is None:  # vLLM: "all requests"
                rt.forget(None)
            else:
                ids = [request_ids] if isinstance(request_ids, str) else request_ids
                rt.forget(ids + [rid for rid in rt.plans
                                 if vllm_compat.live_request(self, rid) is None])
        return result

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            if self.dcpp is not None:
                self.dcpp.close()


class DcppScheduler(_DcppMixin, Scheduler):
    """vLLM's scheduler with dcpp chunk sizing (`--scheduler-cls` value)."""


class DcppAsyncScheduler(_DcppMixin, AsyncScheduler):
    """vLLM's async scheduler with dcpp chunk sizing."""
