"""Worker extension: methods that `collective_rpc` can call on every vLLM worker.

The plugin sets `parallel_config.worker_extension_cls` to `DcppWorkerExtension` when dynamic
chunking is enabled and the user has no extension of their own (otherwise the scheduler sends
the module-level functions below as callables, which vLLM's `collective_rpc` also accepts).
"""

from __future__ import annotations

from typing import Any

from dcpp.integration.vllm import vllm_compat_worker as worker_compat


def stage_timed_prefill(worker: Any, num_tokens: int, history: int, repeats: int = 1) -> dict:
    """Time one prefill chunk on this worker's stage; returns rank info and seconds, or, where
    this worker's model runner cannot time one prefill after a history, ``seconds`` None and
    ``unsupported`` saying why (vLLM's V2 runner;
    `vllm_compat_worker.timed_prefill_unsupported`), so the scheduler calibrates from live
    traffic instead of fitting meaningless timings."""
    info = worker_compat.worker_stage(worker)
    reason = worker_compat.timed_prefill_unsupported(worker)
    if reason is None:
        try:
            info["seconds"] = worker_compat.timed_prefill(worker, num_tokens, history, repeats)
            return info
        except worker_compat.TimedPrefillUnsupported as exc:
            reason = str(exc)
    info["seconds"] = None
    info["unsupported"] = reason
    return info


def enable_step_timing(worker: Any, every: int = 1) -> dict:
    """Start recording this stage's compute time of 1 in `every` steps (need_timing only)."""
    info = worker_compat.worker_stage(worker)
    info["ok"] = worker_compat.install_step_timer(worker, every=every)
    return info


def drain_step_times(worker: Any, every: int | None = None) -> dict:
    """This stage's step compute times recorded since the last call; then time 1 in `every`
    steps (None: keep the rate)."""
    info = worker_compat.worker_stage(worker)
    info["times"] = worker_compat.drain_step_times(worker)
    if every is not None:
        worker_compat.set_step_timing_rate(worker, every)
    return info


class DcppWorkerExtension:
    """Mixed into vLLM's worker class by `worker_extension_cls`."""

    def dcpp_timed_prefill(self, num_tokens: int, history: int, repeats: int = 1) -> dict:
        return stage_timed_prefill(self, num_tokens, history, repeats)

    def dcpp_enable_step_timing(self, every: int = 1) -> dict:
        return enable_step_timing(self, every)

    def dcpp_drain_step_times(self, every: int | None = None) -> dict:
        return drain_step_times(self, every)
