"""`VllmWorkerChannel`: the online core's `WorkerChannel` over vLLM's `collective_rpc`.

The workers' side is `worker_extension` (its `dcpp_*` methods when the plugin installed
`DcppWorkerExtension`, else the module-level functions, which `collective_rpc` also takes).
"""

from __future__ import annotations

from typing import Any

from dcpp.integration.vllm import WORKER_EXTENSION_CLS
from dcpp.integration.vllm import worker_extension as ext


def worker_method(vllm_config: Any, name: str) -> Any:
    """What `collective_rpc` is given for `worker_extension.<name>`: the extension's method
    name where dcpp's extension is installed, else the function itself."""
    if vllm_config.parallel_config.worker_extension_cls == WORKER_EXTENSION_CLS:
        return "dcpp_" + ("timed_prefill" if name == "stage_timed_prefill" else name)
    return getattr(ext, name)


class VllmWorkerChannel:
    def __init__(self, vllm_config: Any, executor: Any) -> None:
        self.vllm_config = vllm_config
        self.executor = executor

    def enable_step_timing(self, every: int) -> list[dict]:
        return self.executor.collective_rpc(
            worker_method(self.vllm_config, "enable_step_timing"), timeout=60, args=(every,))

    def drain_step_times(self, every: int | None) -> Any:
        return self.executor.collective_rpc(
            worker_method(self.vllm_config, "drain_step_times"), args=(every,), non_block=True)
