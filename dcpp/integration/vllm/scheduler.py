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
from dcpp.integration.vllm.adapter import SchedulerAdapter, build_runtime
from dcpp.online.runtime import DcppRuntime


class _DcppMixin:
    """Adds dcpp's chunk sizing to a vLLM scheduler class: each override calls vLLM's method
    and reports the event to `SchedulerAdapter`."""

    dcpp: DcppRuntime | None = None
    """None: dcpp off (also for a scheduler built without __init__, as vLLM's tests do)."""
    _dcpp_events: SchedulerAdapter | None = None

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        vllm_compat.check_scheduler_hook(type(self))
        self.dcpp = build_runtime(vllm_config)
        self._dcpp_events = SchedulerAdapter(self.dcpp) if self.dcpp is not None else None

    def schedule(self, *args: Any, **kwargs: Any):
        ev = self._dcpp_events
        if ev is None:
            return super().schedule(*args, **kwargs)
        ev.begin_step(self)
        try:
            out = super().schedule(*args, **kwargs)
        except BaseException:
            ev.abort_step()
            raise
        ev.end_step(self, out)
        return out

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        ev = self._dcpp_events
        if ev is None or num_new_tokens <= 1:
            return super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                      num_new_tokens)
        sized = ev.size(self, request, num_computed_tokens, num_new_tokens)
        got = super()._reserve_prefill_lookahead(request, num_computed_tokens, sized)
        if got == 0 and sized != num_new_tokens:  # dcpp's cut fell in vLLM's lookahead window
            got = super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                     num_new_tokens)
        ev.commit(request, num_computed_tokens, got)  # what vLLM takes, not what dcpp said
        return got

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any):
        result = super()._preempt_request(request, *args, **kwargs)
        if self._dcpp_events is not None:
            self._dcpp_events.preempted(request)
        return result

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any):
        ev = self._dcpp_events
        t_out = time.monotonic() if ev is not None else 0.0
        result = super().update_from_output(scheduler_output, model_runner_output)
        if ev is not None:
            ev.on_output(scheduler_output, t_out, idle=not self.has_unfinished_requests())
        return result

    def _free_request(self, request: Any, *args: Any, **kwargs: Any):
        # Every finished or aborted request passes here: its dcpp record goes with it.
        result = super()._free_request(request, *args, **kwargs)
        if self._dcpp_events is not None:
            self._dcpp_events.freed(request)
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
