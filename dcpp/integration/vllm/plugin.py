"""vLLM general plugin (entry point group `vllm.general_plugins`, name `dcpp`).

vLLM calls `register()` in every process it starts (API server, EngineCore, workers). It only
wraps the platform's `check_and_update_config` hook; the wrapper does nothing unless
`additional_config` carries a `profiling_chunk_config` block (top level or under
`scheduler_config`). With the block present and enabled it validates the config against the
engine (failing at start-up with a message that names the fix) and switches `scheduler_cls` to
dcpp's scheduler and `worker_extension_cls` to dcpp's worker extension. dcpp's environment
variables are checked there too (`dcpp.envs.check_all`). One thing happens at `register()`
itself, and only when asked for: ``DCPP_NIXL_PROGRESS_THREAD=0`` starts vLLM's NIXL agents
without NIXL's progress thread (`_nixl_progress_thread_setting`).

Which scheduler wins:
- `--scheduler-cls` naming dcpp's scheduler: used (sync or async variant as vLLM requires).
- vllm-ascend in charge (`vllm_ascend_in_charge`): `--scheduler-cls` names a vllm-ascend class,
  or vllm-ascend's platform hook chose its scheduler, or the platform is vllm-ascend's. The
  block is vllm-ascend's then (its hook has already parsed and checked it, with its own rules):
  dcpp stays off before reading it (an info line says why), so nothing in it can fail here.
- `--scheduler-cls` naming any other class: start-up fails (two schedulers cannot both apply).
- no `--scheduler-cls`, but the platform hook chose another non-vLLM scheduler: the platform's
  choice wins and dcpp stays off, with a warning telling how to pick dcpp instead.
- otherwise dcpp's scheduler is installed.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

CONFIG_KEY = "profiling_chunk_config"


def register() -> None:
    """Entry point: install the config hook (idempotent, cheap, no heavy imports)."""
    try:
        from dcpp.integration.vllm import vllm_compat
    except ImportError:  # pragma: no cover - vLLM not installed
        return
    vllm_compat.wrap_platform_config_hook(configure_engine)
    _nixl_progress_thread_setting()


def _nixl_progress_thread_setting() -> None:
    """``DCPP_NIXL_PROGRESS_THREAD=0``: vLLM's NIXL agents in this process start without
    NIXL's progress thread (a decode server without dcpp's block gets it too: the plugin loads
    in every vLLM process). A bad value raises here (vLLM logs it) and at the config hook."""
    from dcpp import envs

    if envs.nixl_progress_thread():
        return
    from dcpp.integration.vllm.vllm_compat_worker import nixl_agents_without_progress_thread

    why_not = nixl_agents_without_progress_thread()
    if why_not is not None:
        logger.warning("dcpp: DCPP_NIXL_PROGRESS_THREAD=0 has no effect: %s", why_not)


def config_block_present(additional_config: Any) -> bool:
    if not isinstance(additional_config, dict):
        return False
    if CONFIG_KEY in additional_config:
        return True
    nested = additional_config.get("scheduler_config")
    return isinstance(nested, dict) and CONFIG_KEY in nested


def _is_dcpp_scheduler(value: Any) -> bool:
    from dcpp.integration.vllm import ASYNC_SCHEDULER_CLS, SCHEDULER_CLS

    if value is None:
        return False
    if isinstance(value, str):
        return value in (SCHEDULER_CLS, ASYNC_SCHEDULER_CLS, "dcpp.integration.vllm.DcppScheduler")
    return getattr(value, "__module__", "").startswith("dcpp.")


def _name(value: Any) -> str:
    if isinstance(value, str):
        return value
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"


def _is_vllm_default(value: Any) -> bool:
    return value is None or _name(value).startswith("vllm.")


def _is_vllm_ascend(value: Any) -> bool:
    return value is not None and _name(value).startswith("vllm_ascend.")


def _platform_module() -> str:
    """Module of vLLM's current platform class (vllm-ascend's: ``vllm_ascend.platform``)."""
    try:
        from vllm.platforms import current_platform

        return str(type(current_platform).__module__)
    except (ImportError, RuntimeError):  # pragma: no cover - no usable platform: not ascend's
        return ""


def vllm_ascend_in_charge(vllm_config: Any, scheduler_cls_before: Any) -> str | None:
    """Why vllm-ascend, not dcpp, owns `profiling_chunk_config` in this engine (None: it does
    not). Naming dcpp's scheduler with `--scheduler-cls` always keeps dcpp in charge."""
    if _is_dcpp_scheduler(scheduler_cls_before):
        return None
    if _is_vllm_ascend(scheduler_cls_before):
        return f"--scheduler-cls names vllm-ascend's scheduler {_name(scheduler_cls_before)}"
    current = vllm_config.scheduler_config.scheduler_cls
    if _is_vllm_ascend(current):
        return f"vllm-ascend's platform selected its scheduler {_name(current)}"
    platform = _platform_module()
    if platform == "vllm_ascend" or platform.startswith("vllm_ascend."):
        return (f"the platform is vllm-ascend's ({platform}), whose own scheduler reads "
                f"{CONFIG_KEY}")
    return None


def configure_engine(vllm_config: Any, scheduler_cls_before: Any = None) -> None:
    """Apply `profiling_chunk_config` to a VllmConfig (runs after the platform hook)."""
    additional = getattr(vllm_config, "additional_config", None)
    if not config_block_present(additional):
        return  # no dcpp block: vLLM exactly as without dcpp

    from dcpp import envs
    from dcpp.config import ProfilingChunkConfig

    from dcpp.integration.vllm import ASYNC_SCHEDULER_CLS, SCHEDULER_CLS, WORKER_EXTENSION_CLS
    from dcpp.integration.vllm import vllm_compat

    ascend = vllm_ascend_in_charge(vllm_config, scheduler_cls_before)
    if ascend is not None:
        # vllm-ascend's hook has parsed and checked the block by its own rules; dcpp checking it
        # again could only reject what vllm-ascend accepts.
        logger.info("dcpp: stays off and leaves %s to vllm-ascend (not read or checked by dcpp): "
                    "%s. To use dcpp instead, pass --scheduler-cls %s",
                    CONFIG_KEY, ascend, SCHEDULER_CLS)
        return

    cfg = ProfilingChunkConfig.from_additional_config(additional)  # ValueError names the key
    sched = vllm_config.scheduler_config
    if not cfg.enabled:
        if _is_dcpp_scheduler(sched.scheduler_cls):
            logger.info("dcpp: scheduler named but profiling_chunk_config.enabled is false; "
                        "vLLM's own chunking is used")
        return
    # Every DCPP_* variable, here in the process that builds the config (before EngineCore is
    # spawned and weights load): a bad value is one ValueError naming it, not an EngineCore
    # traceback later.
    envs.check_all()

    parallel = vllm_config.parallel_config
    cfg.check_engine(
        pipeline_parallel_size=int(parallel.pipeline_parallel_size),
        enable_chunked_prefill=bool(sched.enable_chunked_prefill),
        max_num_batched_tokens=int(sched.max_num_batched_tokens),
    )
    model_config = vllm_config.model_config
    if (vllm_compat.platform_is_cpu() and int(parallel.pipeline_parallel_size) > 1
            and model_config is not None and bool(model_config.enforce_eager)):
        raise ValueError(
            "profiling_chunk_config: enforce_eager=True with pipeline_parallel_size > 1 crashes "
            "pipeline rank 1 on vLLM's CPU backend (vLLM 0.32: intermediate tensors are never "
            "allocated). Drop --enforce-eager / enforce_eager=True; compiled mode works.")

    current = sched.scheduler_cls
    user_named = scheduler_cls_before is not None and not _is_vllm_default(scheduler_cls_before)
    if user_named and not _is_dcpp_scheduler(scheduler_cls_before):
        raise ValueError(
            f"profiling_chunk_config.enabled needs dcpp's scheduler, but --scheduler-cls names "
            f"{_name(scheduler_cls_before)!r}. Drop --scheduler-cls, set it to {SCHEDULER_CLS}, "
            "or disable profiling_chunk_config.")
    if not user_named and not _is_vllm_default(current) and not _is_dcpp_scheduler(current):
        logger.warning(
            "dcpp: the platform selected scheduler %s; it wins and dcpp stays off. "
            "Pass --scheduler-cls %s to use dcpp instead.", _name(current), SCHEDULER_CLS)
        return

    sched.scheduler_cls = ASYNC_SCHEDULER_CLS if sched.async_scheduling else SCHEDULER_CLS
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION_CLS
    logger.info("dcpp: dynamic chunked prefill on (plan_mode=%s, PP=%d): scheduler %s",
                cfg.plan_mode, int(parallel.pipeline_parallel_size), sched.scheduler_cls)
