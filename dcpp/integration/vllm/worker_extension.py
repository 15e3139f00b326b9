"""Worker extension: methods that `collective_rpc` can call on every vLLM worker.

The plugin sets `parallel_config.worker_extension_cls` to `DcppWorkerExtension` when dynamic
chunking is enabled and the user has no extension of their own (otherwise the scheduler sends
`stage_timed_prefill` itself as a callable, which vLLM's `collective_rpc` also accepts).
"""

from __future__ import annotations

from typing import Any

from dcpp.integration.vllm import vllm_compat


def stage_timed_prefill(worker: Any, num_tokens: int, history: int, repeats: int = 1) -> dict:
    """Time one prefill chunk on this worker's stage; returns rank info and seconds."""
    info = vllm_compat.worker_stage(worker)
    info["seconds"] = vllm_compat.timed_prefill(worker, num_tokens, history, repeats)
    return info


class DcppWorkerExtension:
    """Mixed into vLLM's worker class by `worker_extension_cls`."""

    def dcpp_timed_prefill(self, num_tokens: int, history: int, repeats: int = 1) -> dict:
        return stage_timed_prefill(self, num_tokens, history, repeats)
