"""vLLM plugin for dcpp: entry point `dcpp.integration.vllm.plugin:register`.

The scheduler classes live in `dcpp.integration.vllm.scheduler` (imported lazily so that loading
the plugin costs nothing when dynamic chunking is off).
"""

SCHEDULER_CLS = "dcpp.integration.vllm.scheduler.DcppScheduler"
ASYNC_SCHEDULER_CLS = "dcpp.integration.vllm.scheduler.DcppAsyncScheduler"
WORKER_EXTENSION_CLS = "dcpp.integration.vllm.worker_extension.DcppWorkerExtension"
