"""Start-up profiling for the vLLM scheduler: the latency model comes from the profile cache, or
from timed prefill passes on every pipeline stage (`collective_rpc` into the workers), or is
None (static chunking) when neither works.

`load_or_profile` is what the vLLM adapter (`adapter.build_runtime`) calls once at start-up;
the `StartupProfile` it returns is handed to the engine-agnostic `DcppRuntime`. With
``live_calibration``, or where a worker's model runner cannot time a prefill after a history
(the profiling RPC's result says ``unsupported``), it returns no model and the runtime
calibrates from live traffic (`dcpp.online.calibration.live_fit`); the runtime then caches that
fit at the profile's path, so the next start loads it and is dynamic at once.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from dcpp import envs
from dcpp.envs import profile_repeats, profile_timeout_s
from dcpp.integration.vllm import vllm_compat
from dcpp.online.engine import EngineLimits, StartupProfile

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level


def default_cache_dir() -> str:
    """``$DCPP_CACHE_DIR``, else ``~/.cache/dcpp/profiles`` (`dcpp.envs.cache_dir`)."""
    return str(envs.cache_dir())


class ProfilingUnsupported(RuntimeError):
    """A worker reported that its model runner cannot time one prefill after a history."""


def cache_key(vllm_config: Any, cfg: Any) -> dict:
    from dcpp.chunker.profiler import cache_key as make_key

    limits = vllm_compat.engine_limits(vllm_config)
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    connector = vllm_compat.kv_connector(vllm_config)
    # Only with a connector: the keys (and cached files) of engines without one stay as they were.
    extra = {} if connector is None else {"kv_connector": connector}
    return make_key(
        model=str(mc.model),
        dtype=str(mc.dtype).replace("torch.", ""),
        pipeline_parallel_size=int(pc.pipeline_parallel_size),
        tensor_parallel_size=int(pc.tensor_parallel_size),
        device=vllm_compat.platform_device_name(),
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_model_len=limits.max_model_len,
        page_size=limits.page_size,
        num_profile_samples=int(cfg.num_profile_samples),
        vllm=vllm_compat.vllm_version(),
        **extra,
    )


def load_or_profile(vllm_config: Any, cfg: Any, executor: Any | None) -> StartupProfile:
    """The cached profile if readable, else a fresh one (saved to the cache); model None when
    there is no executor or profiling fails."""
    from dcpp.chunker.profiler import cache_path, load_cached

    limits = vllm_compat.engine_limits(vllm_config)
    key = cache_key(vllm_config, cfg)
    cache_dir = cfg.profile_cache_dir or default_cache_dir()
    path = cache_path(key, cache_dir)
    result = StartupProfile(model=None, source="none", path=str(path), passes=0, cache_key=key)
    # A stale or corrupt file: a warning and profiling again; a bug in loading propagates.
    prof = load_cached(path, key, log=logger)
    if prof is not None:
        result.model = prof.model
        result.samples = _samples(prof)
        result.source = "cache"
        logger.info("dcpp: profile loaded from %s (0 profiling passes)", path)
        _log_fit(prof, limits, cfg.plan_mode)
        return result
    if cfg.live_calibration:
        logger.info("dcpp: live_calibration: no start-up profiling; serving vLLM's static "
                    "chunks of max_num_batched_tokens=%d until step timings cover enough "
                    "(chunk, history) points to fit", limits.max_num_batched_tokens)
        return result
    if executor is None:
        logger.warning(
            "dcpp: no model executor reachable from the scheduler (vLLM %s; checked %s); "
            "falling back to static chunking",
            vllm_compat.vllm_version(), ", ".join(vllm_compat.VLLM_VERSIONS_CHECKED))
        return result
    from dcpp.chunker.latency_model import FitError

    budget = profile_timeout_s()
    deadline = time.monotonic() + budget  # one budget for the first try and the retry
    # Best of `repeats` per sample: single passes on shared CPUs carry outliers.
    repeats = profile_repeats()
    passes = [0]
    try:
        try:
            prof = _profile(vllm_config, cfg, limits, executor, key, repeats, deadline, budget,
                            passes)
        except FitError as exc:
            # Timings too noisy to fit (a busy machine at start-up): one more try, each pass
            # the best of twice as many runs.
            logger.warning("dcpp: start-up profile rejected (%s); profiling once more with the "
                           "best of %d runs per pass", exc, 2 * repeats)
            prof = _profile(vllm_config, cfg, limits, executor, key, 2 * repeats, deadline,
                            budget, passes)
    except ProfilingUnsupported as exc:
        result.passes = passes[0]
        result.unsupported = str(exc)
        logger.warning(
            "dcpp: start-up profiling cannot run on this engine's model runner (%s); %s", exc,
            "calibrating from live traffic instead: vLLM's static chunks until step timings "
            "suffice to fit" if cfg.need_timing else
            "falling back to static chunking (need_timing=true would calibrate from live "
            "traffic)")
        return result
    except (FitError, TimeoutError, RuntimeError) as exc:
        # The fit rejected twice, the time budget spent (ours or the RPC's timeout), or the RPC
        # failed (vLLM's executors raise RuntimeError for a worker's error or a dead executor).
        result.passes = passes[0]
        logger.warning(
            "dcpp: start-up profiling failed (%s: %s); falling back to static chunking "
            "(vLLM's own chunks of max_num_batched_tokens=%d)",
            type(exc).__name__, exc, limits.max_num_batched_tokens)
        return result
    result.passes = passes[0]
    result.model = prof.model
    result.samples = _samples(prof)
    result.source = "profiled"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        prof.save(path)
        logger.info("dcpp: profile saved to %s", path)
    except OSError as exc:
        logger.warning("dcpp: could not save profile to %s (%s)", path, exc)
    _log_fit(prof, limits, cfg.plan_mode)
    return result


def _samples(prof: Any) -> list:
    return [([(int(c), int(h))], float(t)) for c, h, t in prof.samples]


def _profile(vllm_config: Any, cfg: Any, limits: EngineLimits, executor: Any, key: dict,
             repeats: int, deadline: float, budget: float, passes: list[int]) -> Any:
    """Profile every stage through `collective_rpc` (each pass the best of `repeats` runs)
    before `deadline` (monotonic s; `budget` s in all); returns the Profile and counts the
    forward passes run in `passes[0]`, also when it raises."""
    from dcpp.chunker.profiler import profile

    from dcpp.integration.vllm.worker_rpc import worker_method

    method = worker_method(vllm_config, "stage_timed_prefill")

    def timed_forward(num_tokens: int, history: int) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"profiling exceeded {budget:.0f} s (set DCPP_PROFILE_TIMEOUT_S or lower "
                "num_profile_samples)")
        results = executor.collective_rpc(
            method, timeout=left, args=(int(num_tokens), int(history), repeats))
        unsupported = [r for r in results if r.get("unsupported")]
        if unsupported:  # nothing was timed (or not what was asked for): never fit it
            raise ProfilingUnsupported("; ".join(
                f"pp_rank {r.get('pp_rank', '?')} tp_rank {r.get('tp_rank', '?')}: "
                f"{r['unsupported']}" for r in unsupported[:2]))
        passes[0] += 1
        per_stage: dict[int, float] = {}  # pp_rank -> seconds (slowest TP rank)
        for r in results:
            rank = int(r.get("pp_rank", -1))
            per_stage[rank] = max(per_stage.get(rank, 0.0), float(r["seconds"]))
        logger.debug("dcpp: profile n=%d h=%d stages=%s", num_tokens, history, per_stage)
        # The slowest stage sets the pipeline's pace.
        return max(per_stage.values())

    t0, first = time.monotonic(), passes[0]
    prof = profile(
        timed_forward,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_model_len=limits.max_model_len,
        num_samples=int(cfg.num_profile_samples),
        page_size=limits.page_size,
        cache_key=key,
        scope="stage",  # timed_forward returns the slowest stage's time
    )
    logger.info("dcpp: profiled %d forward passes over %d PP stages in %.1f s",
                passes[0] - first, limits.num_stages, time.monotonic() - t0)
    return prof


def _log_fit(prof: Any, limits: EngineLimits, plan_mode: str) -> None:
    model = prof.model
    fit = model.to_dict()
    base = min(limits.max_num_batched_tokens, limits.max_model_len)
    target = float(model.predict_time(base, 0))  # seconds
    logger.info(
        "dcpp: latency fit %s from %s samples; target chunk latency %.2f ms "
        "(chunk of %d tokens at history 0); plan_mode=%s",
        fit, getattr(prof, "num_passes", "?"), target * 1e3, base, plan_mode)
