"""vLLM scheduler subclasses that size every prefill chunk with dcpp's chunker.

`DcppScheduler` (sync; what PP on CPU and most PP set-ups use) and `DcppAsyncScheduler` (async
scheduling) add `_DcppMixin` to vLLM's own classes. The mixin does not re-implement
`schedule()`: vLLM keeps deciding which requests run and how many tokens they could take; dcpp
only lowers a prefill request's chunk through vLLM's per-request hook (see `vllm_compat`).

Per request, the chunker's plan is computed when its prefill starts (at the history a prefix-cache
hit leaves) and followed chunk by chunk; whenever the request leaves the plan (a cut by vLLM's
budget, preemption, recomputation) the plan is recomputed from where the request stands. With
several prefills in one step the step has a *time* budget: the first prefill's planned chunk sets
the target time, later prefills get the largest chunk that keeps the step's predicted time within
it. Decode tokens are reserved first so decodes are never starved.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import os
import statistics
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from dcpp.integration.vllm import vllm_compat

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

#: Plan names a request may pick with `SamplingParams(extra_args={"dcpp_plan": ...})`; "off" leaves
#: the request to vLLM's own chunking (what vLLM does without dcpp).
PLAN_OFF = "off"
PLAN_MODES = ("pipeline", "equal_time", "static")

_MAX_LOGGED_REQUESTS = 4096


def default_cache_dir() -> str:
    return os.environ.get("DCPP_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dcpp", "profiles"
    )


def profile_timeout_s() -> float:
    """Wall-clock budget for start-up profiling: DCPP_PROFILE_TIMEOUT_S, else a third of vLLM's
    engine start-up timeout (VLLM_ENGINE_READY_TIMEOUT_S, 600 s by default)."""
    if os.environ.get("DCPP_PROFILE_TIMEOUT_S"):
        return float(os.environ["DCPP_PROFILE_TIMEOUT_S"])
    ready = float(os.environ.get("VLLM_ENGINE_READY_TIMEOUT_S", "600"))
    return max(30.0, ready / 3.0)


@dataclasses.dataclass
class _RequestPlan:
    mode: str
    chunks: list[int]
    """Planned chunk sizes still to run."""
    pos: int
    """Token position where chunks[0] starts."""


class _Step:
    __slots__ = ("prefill_room", "granted", "target_s", "batch")

    def __init__(self, prefill_room: int) -> None:
        self.prefill_room = prefill_room
        self.granted: dict[str, tuple[int, int]] = {}
        self.target_s: float | None = None
        self.batch: list[tuple[int, int]] = []


class DcppRuntime:
    """Chunk sizing state shared by the scheduler hooks: config, latency model, predictors,
    per-request plans, calibration and statistics. Engine-agnostic apart from what the
    scheduler hands it."""

    def __init__(self, vllm_config: Any, cfg: Any, *, executor: Any | None) -> None:
        from dcpp.chunker.calibration import OnlineCalibrator

        sched = vllm_config.scheduler_config
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.max_num_batched_tokens = int(sched.max_num_batched_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.page_size = int(vllm_config.cache_config.block_size or 16)
        self.num_stages = int(vllm_config.parallel_config.pipeline_parallel_size)
        self.model: Any | None = None
        self.profile_source = "none"
        self.profile_path: str | None = None
        self.num_profile_passes = 0
        self.predictors: dict[str, Any] = {}
        self.plans: dict[str, _RequestPlan] = {}
        self.chunk_log: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        """Executed prefill chunk sizes per request (most recent requests)."""
        self.plan_log: collections.OrderedDict[str, tuple[int, list[int]]] = (
            collections.OrderedDict())
        """Per request: (history at its first chunk, the chunks planned for it)."""
        self.pending: dict[int, tuple[float, list[tuple[int, int]], bool]] = {}
        self.last_output_t: float | None = None
        self.errors: collections.deque[float] = collections.deque(
            maxlen=int(cfg.calibration_window)
        )
        self.num_observations = 0
        self.num_refits = 0
        self._drift_events = 0
        self.step: _Step | None = None

        # Per-stage step timing (need_timing): workers record their compute time per step;
        # the scheduler collects the records with non-blocking RPCs (see `_poll_stage_times`).
        self.executor = executor
        self.stage_timing = False
        self.compute_model: Any | None = None
        """Latency model of the slowest stage's compute (what the workers measure)."""
        self.overheads: collections.deque[float] = collections.deque(maxlen=64)
        """Recent (step interval - slowest-stage compute): the engine's per-step overhead."""
        self.interval_errors: collections.deque[float] = collections.deque(
            maxlen=int(cfg.calibration_window))
        self.sent: collections.deque[list] = collections.deque(maxlen=4096)
        self.step_log: collections.deque[tuple[list, float, float]] = collections.deque(
            maxlen=1024)
        """Recent prefill steps: (batch of (chunk, history), predicted s, measured s) on the
        slowest stage's compute (for reports such as `make demo`)."""
        self.drain: tuple[Any, list] | None = None

        self._load_or_profile(executor)
        self.calibrator = None
        if cfg.need_timing and self.model is not None:
            self.calibrator = OnlineCalibrator(
                self.model, window=cfg.calibration_window, drift_threshold=cfg.drift_threshold
            )
            self.compute_model = self.model
            self.model_profiled = self.model
            self.compute_scale = 1.0
            self.ratios: collections.deque[float] = collections.deque(
                maxlen=int(cfg.calibration_window))
            self._enable_stage_timing()
        self._build_predictors()

    # ------------------------------------------------------------------ start-up profiling

    def cache_key(self) -> dict:
        from dcpp.chunker.profiler import cache_key

        mc = self.vllm_config.model_config
        pc = self.vllm_config.parallel_config
        return cache_key(
            model=str(mc.model),
            dtype=str(mc.dtype).replace("torch.", ""),
            pipeline_parallel_size=int(pc.pipeline_parallel_size),
            tensor_parallel_size=int(pc.tensor_parallel_size),
            device=vllm_compat.platform_device_name(),
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            page_size=self.page_size,
            num_profile_samples=int(self.cfg.num_profile_samples),
            vllm=vllm_compat.vllm_version(),
        )

    def _load_or_profile(self, executor: Any | None) -> None:
        from dcpp.chunker.profiler import Profile, cache_path

        key = self.cache_key()
        cache_dir = self.cfg.profile_cache_dir or default_cache_dir()
        path = cache_path(key, cache_dir)
        self.profile_path = str(path)
        if os.path.exists(path):
            try:
                prof = Profile.load(path)
                self.model = prof.model
                self.profile_source = "cache"
                logger.info("dcpp: profile loaded from %s (0 profiling passes)", path)
                self._log_fit(prof)
                return
            except Exception as exc:  # a stale or corrupt file: profile again
                logger.warning("dcpp: ignoring unreadable profile %s (%s); profiling again",
                               path, exc)
        if executor is None:
            logger.warning(
                "dcpp: no model executor reachable from the scheduler (vLLM %s; checked %s); "
                "falling back to static chunking",
                vllm_compat.vllm_version(), ", ".join(vllm_compat.VLLM_VERSIONS_CHECKED))
            return
        try:
            prof = self._profile(executor, key)
        except Exception as exc:
            logger.warning(
                "dcpp: start-up profiling failed (%s: %s); falling back to static chunking "
                "(vLLM's own chunks of max_num_batched_tokens=%d)",
                type(exc).__name__, exc, self.max_num_batched_tokens)
            return
        self.model = prof.model
        self.profile_source = "profiled"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            prof.save(path)
            logger.info("dcpp: profile saved to %s", path)
        except OSError as exc:
            logger.warning("dcpp: could not save profile to %s (%s)", path, exc)
        self._log_fit(prof)

    def _profile(self, executor: Any, key: dict) -> Any:
        from dcpp.chunker.profiler import profile

        from dcpp.integration.vllm import WORKER_EXTENSION_CLS
        from dcpp.integration.vllm.worker_extension import stage_timed_prefill

        use_ext = self.vllm_config.parallel_config.worker_extension_cls == WORKER_EXTENSION_CLS
        method = "dcpp_timed_prefill" if use_ext else stage_timed_prefill
        budget = profile_timeout_s()
        # Best of `repeats` per sample: single passes on shared CPUs carry outliers.
        repeats = int(os.environ.get("DCPP_PROFILE_REPEATS", "2"))
        deadline = time.monotonic() + budget
        passes = 0

        def timed_forward(num_tokens: int, history: int) -> float:
            nonlocal passes
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"profiling exceeded {budget:.0f} s (set DCPP_PROFILE_TIMEOUT_S or lower "
                    "num_profile_samples)")
            results = executor.collective_rpc(
                method, timeout=left, args=(int(num_tokens), int(history), repeats))
            passes += 1
            per_stage: dict[int, float] = {}
            for r in results:
                rank = int(r.get("pp_rank", -1))
                per_stage[rank] = max(per_stage.get(rank, 0.0), float(r["seconds"]))
            logger.debug("dcpp: profile n=%d h=%d stages=%s", num_tokens, history, per_stage)
            # The slowest stage sets the pipeline's pace.
            return max(per_stage.values())

        t0 = time.monotonic()
        prof = profile(
            timed_forward,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            num_samples=int(self.cfg.num_profile_samples),
            page_size=self.page_size,
            cache_key=key,
            scope="stage",  # timed_forward returns the slowest stage's time
        )
        self.num_profile_passes = passes
        logger.info("dcpp: profiled %d forward passes over %d PP stages in %.1f s",
                    passes, self.num_stages, time.monotonic() - t0)
        return prof

    def _log_fit(self, prof: Any) -> None:
        model = prof.model
        try:
            fit = model.to_dict()
        except Exception:
            fit = repr(model)
        base = min(self.max_num_batched_tokens, self.max_model_len)
        try:
            target = model.predict_time(base, 0)
        except Exception:
            target = float("nan")
        logger.info(
            "dcpp: latency fit %s from %s samples; target chunk latency %.2f ms "
            "(chunk of %d tokens at history 0); plan_mode=%s",
            fit, getattr(prof, "num_passes", "?"), target * 1e3, base, self.cfg.plan_mode)

    def _build_predictors(self) -> None:
        from dcpp.chunker.predictor import ChunkPredictor

        self.predictors = {}
        if self.model is None:
            return
        for mode in PLAN_MODES:
            cfg = dataclasses.replace(self.cfg, plan_mode=mode)
            self.predictors[mode] = ChunkPredictor(
                cfg, self.model,
                max_num_batched_tokens=self.max_num_batched_tokens,
                page_size=self.page_size,
                max_model_len=self.max_model_len,
                num_stages=self.num_stages,
            )

    def set_model(self, model: Any) -> None:
        self.model = model
        for p in self.predictors.values():
            p.set_model(model)
        # Requests in flight keep the plan they were admitted with; new plans use the new fit.

    # ------------------------------------------------------------------ scheduling

    def mode_for(self, request: Any) -> str:
        override = vllm_compat.request_plan_override(request)
        if override is None:
            return self.cfg.plan_mode
        if override != PLAN_OFF and override not in PLAN_MODES:
            logger.warning("dcpp: unknown dcpp_plan %r on request %s; using %s", override,
                           request.request_id, self.cfg.plan_mode)
            return self.cfg.plan_mode
        return override

    def begin_step(self, scheduler: Any) -> None:
        decode_tokens = 0
        for r in scheduler.running:
            if r.num_tokens - r.num_computed_tokens <= 1:
                decode_tokens += max(0, r.num_tokens_with_spec - r.num_computed_tokens)
        self.step = _Step(max(0, scheduler.max_num_scheduled_tokens - decode_tokens))

    def _plan(self, request: Any, mode: str, history: int) -> _RequestPlan:
        total = int(request.num_tokens)
        chunks = [int(c) for c in self.predictors[mode].plan(total - history, history=history)]
        if sum(chunks) != total - history or any(c <= 0 for c in chunks):
            raise AssertionError(
                f"chunker plan {chunks} does not cover tokens {history}..{total}")
        return _RequestPlan(mode=mode, chunks=chunks, pos=history)

    def cap(self, request: Any, history: int, offered: int) -> int:
        """Chunk for `request` this step: at most `offered` (vLLM's own number)."""
        step = self.step
        if step is None or self.model is None or offered <= 0:
            return offered
        remaining = int(request.num_tokens) - int(history)
        if remaining <= 1:  # a decode (or its spec tokens): never touched
            return offered
        mode = self.mode_for(request)
        if mode == PLAN_OFF:
            return offered
        rid = request.request_id
        plan = self.plans.get(rid)
        if plan is None or plan.mode != mode or plan.pos != history or not plan.chunks:
            plan = self._plan(request, mode, history)
            self.plans[rid] = plan
            done = self.chunk_log.get(rid, []) if rid in self.plan_log else []
            start = self.plan_log[rid][0] if rid in self.plan_log else history
            self.plan_log[rid] = (start, list(done) + list(plan.chunks))
            if len(self.plan_log) > _MAX_LOGGED_REQUESTS:
                self.plan_log.popitem(last=False)
        want = min(plan.chunks[0], offered, step.prefill_room)
        if want <= 0:
            return 0
        if step.target_s is None:
            step.target_s = float(self.model.predict_time(plan.chunks[0], history))
        elif step.batch:
            want = self._fit_time(step, want, history, remaining)
        if want <= 0:
            return 0
        step.granted[rid] = (history, want)
        step.batch.append((want, history))
        step.prefill_room -= want
        return want

    def _fit_time(self, step: _Step, want: int, history: int, remaining: int) -> int:
        """Largest chunk <= want keeping the step's predicted time within the target."""
        base = list(step.batch)

        def fits(c: int) -> bool:
            return float(self.model.predict_batch(base + [(c, history)])) <= step.target_s

        if fits(want):
            return want
        align = max(self.page_size, 64)
        sizes = list(range(align, want, align))
        if not sizes or not fits(sizes[0]):
            return 0
        # Largest aligned size that still fits (predicted time grows with the chunk).
        idx = bisect.bisect_left([not fits(s) for s in sizes], True)
        return sizes[idx - 1] if idx > 0 else 0

    def end_step(self, scheduler: Any, out: Any) -> None:
        step, self.step = self.step, None
        now = time.monotonic()
        batch: list[tuple[int, int]] = []
        has_prefill = False
        for rid, n in out.num_scheduled_tokens.items():
            req = scheduler.requests.get(rid)
            if req is None:
                continue
            n = int(n)
            history = int(req.num_computed_tokens) - n
            batch.append((n, history))
            if history + 1 < req.num_tokens or n > 1:
                is_prefill = history < req.num_prompt_tokens or n > 1
            else:
                is_prefill = False
            if not is_prefill:
                continue
            has_prefill = True
            log = self.chunk_log.setdefault(rid, [])
            log.append(n)
            if len(self.chunk_log) > _MAX_LOGGED_REQUESTS:
                self.chunk_log.popitem(last=False)
            plan = self.plans.get(rid)
            if plan is not None and step is not None and rid in step.granted:
                if plan.chunks and n == plan.chunks[0] and plan.pos == history:
                    plan.chunks.pop(0)
                    plan.pos = history + n
                else:  # vLLM cut the chunk further: replan from where the request is
                    plan.chunks = []
                    plan.pos = history + n
            if history + n >= req.num_tokens:
                self.plans.pop(rid, None)
                logger.debug("dcpp: request %s prefill chunks %s", rid, log)
        if self.cfg.need_timing and batch:
            entry = [vllm_compat.step_fingerprint(out), batch, has_prefill, None]
            self.pending[id(out)] = (now, batch, has_prefill, entry)
            if self.stage_timing:
                self.sent.append(entry)
            if len(self.pending) > 64:  # outputs that never came back (should not happen)
                for k in list(self.pending)[:-64]:
                    del self.pending[k]

    def on_output(self, scheduler_output: Any, t_out: float, idle: bool = False) -> None:
        if not self.cfg.need_timing:
            return
        entry = self.pending.pop(id(scheduler_output), None)
        last, self.last_output_t = self.last_output_t, t_out
        if entry is not None and self.model is not None:
            t_sched, batch, has_prefill = entry[:3]
            # Only steps that queued behind another in the pipeline measure the pace (the step
            # interval); the first step of a burst also includes the fill of all stages.
            if has_prefill and last is not None and last > t_sched and t_out > last:
                self._observe_interval(batch, t_out - last, entry[3] if len(entry) > 3 else None)
        if self.stage_timing:
            self._poll_stage_times(idle)

    def _observe_interval(self, batch: list, elapsed: float, sent: list | None) -> None:
        predicted = float(self.model.predict_batch(batch))
        if self.stage_timing:
            # Compute is calibrated on the workers' own timings; the interval only tells the
            # per-step overhead (kept on the step until its compute time arrives).
            self.interval_errors.append(abs(predicted - elapsed) / elapsed)
            if sent is not None:
                sent[3] = elapsed
            return
        self.errors.append(abs(predicted - elapsed) / elapsed)
        self._observe(batch, elapsed)

    def _observe(self, batch: list, seconds: float) -> None:
        """One step's measured time for the calibrator (interval, or slowest-stage compute)."""
        self.num_observations += 1
        if self.calibrator is not None:
            self.calibrator.observe(batch, seconds)
            new_model = self.calibrator.model
            if new_model is not None and new_model is not self.compute_model:
                self.num_refits += 1
                drift = getattr(self.calibrator, "drift_events", 0)
                log = logger.info if drift != self._drift_events else logger.debug
                self._drift_events = drift
                log("dcpp: recalibrated latency model from step timings (refit %d%s): %s",
                    self.num_refits, ", drift detected" if log is logger.info else "",
                    _fit_repr(new_model))
                self.compute_model = new_model
                self.set_model(self._planning_model())
        if self.num_observations % 50 == 0:
            logger.info("dcpp: median chunk-latency prediction error %.1f%% over last %d steps"
                        "%s", 100 * self.median_error(), len(self.errors),
                        f"; per-step overhead {1e3 * self.overhead_s():.2f} ms"
                        if self.stage_timing else "")

    # ------------------------------------------------------------------ per-stage timing

    def _rpc(self, name: str) -> Any:
        from dcpp.integration.vllm import WORKER_EXTENSION_CLS
        from dcpp.integration.vllm import worker_extension as ext

        if self.vllm_config.parallel_config.worker_extension_cls == WORKER_EXTENSION_CLS:
            return "dcpp_" + name
        return getattr(ext, name)

    def _enable_stage_timing(self) -> None:
        if self.executor is None:
            return
        try:
            res = self.executor.collective_rpc(self._rpc("enable_step_timing"), timeout=60)
            self.stage_timing = bool(res) and all(
                isinstance(r, dict) and r.get("ok") for r in res)
        except Exception as exc:
            logger.warning("dcpp: per-stage step timing unavailable (%s: %s); calibrating on "
                           "step intervals", type(exc).__name__, exc)
            self.stage_timing = False
        if self.stage_timing:
            logger.info("dcpp: per-stage step timing on (%d workers)", len(res))

    def _poll_stage_times(self, idle: bool) -> None:
        """Collect the workers' step times without stalling the pipeline: a drain RPC is
        sent non-blocking and read once vLLM has resolved it (its futures resolve in order as
        the engine waits on its own steps); when the engine is idle it is read at once."""
        if self.drain is not None and (idle or vllm_compat.future_done(self.drain[0])):
            future, steps = self.drain
            self.drain = None
            try:
                self._match_stage_times(future.result(), steps)
            except Exception as exc:
                logger.warning("dcpp: collecting step times failed (%s: %s); per-stage "
                               "timing off", type(exc).__name__, exc)
                self.stage_timing = False
                return
        if self.drain is None and self.sent and (idle or len(self.sent) >= 8):
            steps = list(self.sent)
            self.sent.clear()
            try:
                future = self.executor.collective_rpc(self._rpc("drain_step_times"),
                                                      non_block=True)
            except Exception as exc:
                logger.warning("dcpp: step-time RPC failed (%s: %s); per-stage timing off",
                               type(exc).__name__, exc)
                self.stage_timing = False
                return
            self.drain = (future, steps)
            if idle:
                self._poll_stage_times(idle=True)

    def _match_stage_times(self, results: list, steps: list) -> None:
        per_rank: dict[int, dict[int, list[float]]] = {}
        for r in results:
            rank = int(r.get("pp_rank", -1))
            table = per_rank.setdefault(rank, {})
            for fp, secs in r.get("times", []):
                table.setdefault(int(fp), []).append(float(secs))
        if not per_rank:
            return
        for fp, batch, has_prefill, interval in steps:
            times = []
            for table in per_rank.values():
                got = table.get(fp)
                if got:
                    times.append(got.pop(0))
            if len(times) != len(per_rank) or not has_prefill:
                continue
            measured = max(times)  # the slowest stage sets the pace
            if measured <= 0:
                continue
            predicted = float(self.compute_model.predict_batch(batch))
            self.errors.append(abs(predicted - measured) / measured)
            self.step_log.append((list(batch), predicted, measured))
            if interval is not None:
                self.overheads.append(interval - measured)
            self._observe_compute(batch, measured)

    def _observe_compute(self, batch: list, measured: float) -> None:
        """Calibrate on one step's slowest-stage compute. The start-up profile (clean,
        best-of-N passes over the whole (chunk, history) range) keeps its shape; the online
        timings, noisy on a shared machine and clustered where requests actually run, only
        rescale it: the model in use is the profile times the median measured/predicted ratio
        of the recent steps (a full 5-coefficient refit from a few noisy steps extrapolates
        badly and, with drift detection, thrashes)."""
        base = float(self.model_profiled.predict_batch(batch))
        self.num_observations += 1
        if base <= 0:
            return
        self.ratios.append(measured / base)
        if len(self.ratios) < 4 or len(self.ratios) % 4:
            return
        scale = statistics.median(self.ratios)
        if abs(scale / self.compute_scale - 1.0) > 0.01:
            self.compute_scale = scale
            self.compute_model = self.model_profiled.scaled(scale)
            self.num_refits += 1
            logger.debug("dcpp: recalibrated: profile x %.3f", scale)
        planning = self._planning_model()
        if planning != self.model:
            self.set_model(planning)
        if self.num_observations % 50 == 0:
            logger.info("dcpp: median chunk-latency prediction error %.1f%% over last %d steps; "
                        "profile x %.3f; per-step overhead %.2f ms", 100 * self.median_error(),
                        len(self.errors), self.compute_scale, 1e3 * self.overhead_s())

    def overhead_s(self) -> float:
        """Median per-step overhead beyond the slowest stage's compute (>= 0)."""
        return max(0.0, statistics.median(self.overheads)) if self.overheads else 0.0

    def _planning_model(self) -> Any:
        """The compute model plus the engine's per-step overhead (what the planner needs: the
        fixed cost per step decides the chunk count)."""
        m = self.compute_model
        if not self.stage_timing or m is None:
            return m
        over = self.overhead_s()
        if over <= 0:
            return m
        return dataclasses.replace(m, c=m.c + over)

    def median_error(self) -> float:
        """Median |predicted / measured - 1| of the recent steps, each predicted with the model
        in use when it ran."""
        return statistics.median(self.errors) if self.errors else float("nan")

    def forget(self, request_ids: Any) -> None:
        for rid in request_ids:
            self.plans.pop(rid, None)

    def stats(self) -> dict:
        return {
            "profile_source": self.profile_source,
            "profile_path": self.profile_path,
            "num_profile_passes": self.num_profile_passes,
            "num_observations": self.num_observations,
            "num_refits": self.num_refits,
            "median_prediction_error": self.median_error(),
            "stage_timing": self.stage_timing,
            "overhead_s": self.overhead_s(),
            "median_interval_error": (statistics.median(self.interval_errors)
                                      if self.interval_errors else float("nan")),
            "model": _fit_repr(self.model),
        }


def _fit_repr(model: Any) -> Any:
    if model is None:
        return None
    try:
        return model.to_dict()
    except Exception:
        return repr(model)


def build_runtime(vllm_config: Any) -> DcppRuntime | None:
    """Validate the config block and build the runtime; None when dcpp is off."""
    from dcpp.config import ProfilingChunkConfig

    cfg = ProfilingChunkConfig.from_additional_config(_additional(vllm_config))
    if not cfg.enabled:
        logger.info("dcpp: scheduler loaded but profiling_chunk_config.enabled is false; "
                    "vLLM's own chunking is used")
        return None
    sched = vllm_config.scheduler_config
    cfg = cfg.check_engine(
        pipeline_parallel_size=int(vllm_config.parallel_config.pipeline_parallel_size),
        enable_chunked_prefill=bool(sched.enable_chunked_prefill),
        max_num_batched_tokens=int(sched.max_num_batched_tokens),
    )
    return DcppRuntime(vllm_config, cfg, executor=vllm_compat.find_engine_executor())


def _additional(vllm_config: Any) -> dict | None:
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, dict) else None


class _DcppMixin:
    """Adds dcpp's chunk sizing to a vLLM scheduler class."""

    dcpp: DcppRuntime | None

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        vllm_compat.check_scheduler_hook(type(self))
        self.dcpp = build_runtime(vllm_config)

    def schedule(self, *args: Any, **kwargs: Any):
        rt = self.dcpp
        if rt is None:
            return super().schedule(*args, **kwargs)
        rt.begin_step(self)
        try:
            out = super().schedule(*args, **kwargs)
        except BaseException:
            rt.step = None
            raise
        rt.end_step(self, out)
        return out

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        rt = self.dcpp
        if rt is not None and num_new_tokens > 1:
            num_new_tokens = rt.cap(request, int(num_computed_tokens), int(num_new_tokens))
        return super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any):
        rt = self.dcpp
        t_out = time.monotonic() if rt is not None else 0.0
        result = super().update_from_output(scheduler_output, model_runner_output)
        if rt is not None:
            rt.on_output(scheduler_output, t_out, idle=not self.has_unfinished_requests())
            if rt.plans:
                rt.forget([rid for rid in rt.plans if rid not in self.requests])
        return result

    def finish_requests(self, request_ids: Any, finished_status: Any):
        result = super().finish_requests(request_ids, finished_status)
        rt = self.dcpp
        if rt is not None and rt.plans:
            rt.forget([rid for rid in rt.plans if rid not in self.requests])
        return result


class DcppScheduler(_DcppMixin, Scheduler):
    """vLLM's scheduler with dcpp chunk sizing (`--scheduler-cls` value)."""


class DcppAsyncScheduler(_DcppMixin, AsyncScheduler):
    """vLLM's async scheduler with dcpp chunk sizing."""
