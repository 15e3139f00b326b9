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

The latency model comes from `startup_profile` (profile cache or start-up profiling); with
need_timing it is calibrated online on step intervals or, where the workers record them, on
per-stage step times collected by `stage_timing`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import statistics
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from dcpp.integration.vllm import calibration_store, vllm_compat
from dcpp.integration.vllm.chunk_sizer import (  # noqa: F401 - PLAN_* re-exported
    MAX_LOGGED_REQUESTS,
    PLAN_MODES,
    PLAN_OFF,
    Ask,
    ChunkSizer,
)
from dcpp.integration.vllm.metrics import start_metrics
from dcpp.integration.vllm.stage_timing import SentStep, StageTiming
from dcpp.integration.vllm.step_ledger import LedgerEntry, StepLedger
from dcpp.integration.vllm.startup_profile import EngineLimits, load_or_profile
from dcpp.integration.vllm.startup_profile import cache_key as profile_cache_key
from dcpp.integration.vllm.startup_profile import (  # noqa: F401 - re-exported (lived here)
    default_cache_dir,
    profile_timeout_s,
)

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

_MAX_LOGGED_REQUESTS = MAX_LOGGED_REQUESTS

REFIT_MIN_STEPS = 64
"""Prefill step timings needed before the base model is refitted on them."""

REFIT_EVERY = 32
"""Steps between refits of the base model (each is one small least-squares fit)."""

ONLINE_MAX_MEDIAN_ERROR = 0.35
ONLINE_MIN_R2 = 0.5
"""Quality gates of the online refit: a step's compute on a shared CPU scatters 10-20% around
the median of the same step repeated (measured by benchmarks/vllm_ttft.py)."""

SCALE_WINDOW = 64
SCALE_MIN_STEPS = 4
"""The fast scale is the median measured/base ratio of the last `SCALE_WINDOW` prefill steps,
spanning several requests: consecutive steps come from one region of (chunk, history), and a few
of them must not rescale every other region. A refit refills the window against the new base.
Only at start-up (profile vs real steps, often a global offset) do `SCALE_MIN_STEPS` suffice."""

TIMING_SAMPLE_EVERY = 8
"""Once calibrated, workers time (and synchronise on) 1 in this many steps."""

DRIFT_SPAN = 8
"""Recent steps whose median error decides whether drift is suspected (all steps timed)."""

STEADY = 0.10
"""Consecutive prefill steps whose slowest-stage compute differs by at most this fraction count
as a steady pipeline (only those measure the per-step overhead)."""


class DcppRuntime:
    """Chunk sizing state shared by the scheduler hooks: config, latency model, predictors,
    per-request plans, calibration and statistics. Engine-agnostic apart from what the
    scheduler hands it."""

    def __init__(self, vllm_config: Any, cfg: Any, *, executor: Any | None) -> None:
        limits = EngineLimits.from_vllm_config(vllm_config)
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.max_num_batched_tokens = limits.max_num_batched_tokens
        self.max_model_len = limits.max_model_len
        self.page_size = limits.page_size
        self.num_stages = limits.num_stages
        self.predictors: dict[str, Any] = {}
        self.sizer: ChunkSizer | None = None
        """Per-request plans and the step budget (built with the predictors)."""
        self.chunk_log: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        """Executed prefill chunk sizes per request (most recent requests)."""
        self.ledger = StepLedger()
        """Steps sent whose output has not come back (timing and prefill ends)."""
        self.last_output_t: float | None = None
        self.errors: collections.deque[float] = collections.deque(
            maxlen=int(cfg.calibration_window)
        )
        self.num_observations = 0
        self.num_refits = 0
        self._drift_events = 0
        """Refits forced by drift (the recent steps' median error above drift_threshold)."""

        # Per-stage step timing (need_timing): workers record their compute time per step;
        # `timing` collects the records with non-blocking RPCs (see `StageTiming.poll`).
        self.timing = StageTiming(vllm_config, executor)
        self.compute_model: Any | None = None
        """Latency model of the slowest stage's compute (what the workers measure)."""
        self.overheads: collections.deque[float] = collections.deque(maxlen=64)
        """Recent (step interval - slowest-stage compute) of steady steps: the engine's per-step
        overhead."""
        self._prev_measured: float | None = None
        self._prefills: collections.OrderedDict[str, list] = collections.OrderedDict()
        """Requests in prefill: [first chunk scheduled at (monotonic s), history at that chunk,
        plan mode, ran alone in every step so far]."""
        self.request_gaps: collections.deque[float] = collections.deque(maxlen=32)
        """Per planned request that ran alone: (measured prefill time - the compute model's TTFT
        of its chunks) / (steps + P - 1), in s: the per-step cost the pipeline really adds."""
        self.interval_errors: collections.deque[float] = collections.deque(
            maxlen=int(cfg.calibration_window))
        self.step_log: collections.deque[tuple[list, float, float]] = collections.deque(
            maxlen=1024)
        """Recent prefill steps: (batch of (chunk, history), predicted s, measured s) on the
        slowest stage's compute (for reports such as `make demo`)."""

        self._calibration_path: str | None = None
        """Where calibration is saved (`calibration_store`); None: not saved."""
        self._saved_at = float("-inf")  # monotonic s of the last save (none yet)
        self._unsaved = False
        """Whether calibration learnt something since the last save."""
        self._save_warned = False

        prof = load_or_profile(vllm_config, cfg, executor)
        self.model: Any | None = prof.model
        self.profile_source = prof.source
        self.profile_path: str | None = prof.path
        self.num_profile_passes = prof.passes
        self.metrics = start_metrics(
            int(cfg.metrics_port),
            rank=int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0))
        if self.metrics is not None:
            self.metrics.profile_passes.set(self.num_profile_passes)
            self.metrics.active.set(1 if self.model is not None else 0)
        self.calibrating = bool(cfg.need_timing and self.model is not None)
        """Whether step timings calibrate the model (one set of rules, two measurement
        sources: the workers' per-stage times, else the step intervals)."""
        if self.calibrating:
            self.compute_model = self.model
            self.model_base = self.model
            """The shape calibration rescales: the start-up profile, later the latest refit of
            the profile's points plus recent step timings."""
            self.model_base_profile = self.model
            self.compute_scale = 1.0
            self.ratios: collections.deque[float] = collections.deque(maxlen=SCALE_WINDOW)
            """measured / base-model time of the recent prefill steps."""
            self.profile_samples = list(prof.samples)
            self.step_samples: collections.deque[tuple[list, float]] = collections.deque(
                maxlen=int(cfg.calibration_window))
            """Recent prefill steps: (batch of (chunk, history), measured s)."""
            self.last_refit_error: str | None = None
            self._drift_refit_at = 0  # observation count of the last refit drift forced
            self.timing.enable()
            self._restore_calibration(prof)
        self._build_predictors()

    @property
    def stage_timing(self) -> bool:
        """Whether calibration runs on the workers' per-stage step times."""
        return self.timing.on

    @stage_timing.setter
    def stage_timing(self, on: bool) -> None:
        self.timing.on = on

    def cache_key(self) -> dict:
        return profile_cache_key(self.vllm_config, self.cfg)

    def _build_predictors(self) -> None:
        from dcpp.chunker.predictor import ChunkPredictor

        self.predictors = {}
        if self.model is None:
            self.sizer = None
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
        spec = self.predictors[PLAN_MODES[0]].spec
        self.sizer = ChunkSizer(lambda mode, n, h: self.predictors[mode].plan(n, history=h),
                                floor=spec.floor, align=spec.align)
        self.sizer.model = self.model

    @property
    def plans(self) -> dict:
        return self.sizer.plans if self.sizer is not None else {}

    @property
    def plan_log(self) -> dict:
        return self.sizer.plan_log if self.sizer is not None else {}

    def set_model(self, model: Any) -> None:
        self.model = model
        for p in self.predictors.values():
            p.set_model(model)
        if self.sizer is not None:
            self.sizer.model = model
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
        if self.sizer is not None:
            self.sizer.begin_step(scheduler.max_num_scheduled_tokens
                                  - vllm_compat.decode_tokens(scheduler))

    def cap(self, scheduler: Any, request: Any, history: int, offered: int) -> int:
        """Chunk for `request` this step: in [1, `offered`] (vLLM's own number)."""
        sizer = self.sizer
        if sizer is None or not sizer.in_step or offered <= 1:
            return offered
        ask = Ask(request_id=request.request_id, mode=self.mode_for(request),
                  total=vllm_compat.request_num_tokens(request), history=int(history),
                  offered=int(offered),
                  encoder_spans=vllm_compat.unsplittable_encoder_spans(scheduler, request),
                  block_align=vllm_compat.mamba_block_align(scheduler))
        return sizer.size(ask)

    def end_step(self, scheduler: Any, out: Any) -> None:
        if self.sizer is not None:
            self.sizer.end_step()
        now = time.monotonic()
        batch: list[tuple[int, int]] = []
        has_prefill = False
        finishing: list[str] = []
        for rid, n, history, prefill, total in vllm_compat.scheduled_requests(scheduler, out):
            batch.append((n, history))
            if not prefill:
                continue
            has_prefill = True
            if self.cfg.need_timing and rid not in self._prefills:
                self._prefills[rid] = [now, history,
                                       self.mode_for(scheduler.requests[rid]), True]
                if len(self._prefills) > _MAX_LOGGED_REQUESTS:
                    self._prefills.popitem(last=False)
            if self.metrics is not None:
                self.metrics.chunk_tokens.observe(n)
            log = self.chunk_log.setdefault(rid, [])
            log.append(n)
            if len(self.chunk_log) > _MAX_LOGGED_REQUESTS:
                self.chunk_log.popitem(last=False)
            if self.sizer is not None:
                self.sizer.advance(rid, history, n)
            if history + n >= total:
                finishing.append(rid)
                if self.sizer is not None:
                    self.sizer.forget([rid])
                logger.debug("dcpp: request %s prefill chunks %s", rid, log)
        if self.cfg.need_timing and batch:
            if len(batch) > 1:  # shared steps: these requests' prefill times are not their own
                for rid in out.num_scheduled_tokens:
                    if rid in self._prefills:
                        self._prefills[rid][3] = False
            sent = self.timing.track(out, batch, has_prefill)
            self.ledger.push(LedgerEntry(sent.fingerprint, now, batch, has_prefill, finishing,
                                         sent))

    def on_output(self, scheduler_output: Any, t_out: float, idle: bool = False) -> None:
        if not self.cfg.need_timing:
            return
        entry = self.ledger.pop(vllm_compat.step_fingerprint(scheduler_output))
        last, self.last_output_t = self.last_output_t, t_out
        if entry is not None and self.model is not None:
            # Only steps that queued behind another in the pipeline measure the pace (the step
            # interval); the first step of a burst also includes the fill of all stages.
            if (entry.has_prefill and last is not None and last > entry.scheduled_at
                    and t_out > last):
                self._observe_interval(entry.batch, t_out - last, entry.sent)
        if self.stage_timing:
            self.timing.poll(idle, self._observe_stage_time)
        if entry is not None and entry.finishing:
            self._observe_requests(entry.finishing, t_out)
        if (idle and self._unsaved
                and time.monotonic() - self._saved_at >= calibration_store.SAVE_IDLE_S):
            # vLLM's API server kills the engine core at shutdown (unless --shutdown-timeout
            # is set), so an idle engine is where the state reliably gets to disk.
            self.save_calibration()

    def _observe_requests(self, request_ids: list[str], t_out: float) -> None:
        """Compare each finished prefill's measured time with the compute model's TTFT of the
        chunks it ran: the difference per step is what the planner must charge for every extra
        chunk (engine turnaround, hand-offs, stage imbalance and jitter in a pipeline of short
        steps), which per-step compute timings cannot see."""
        from dcpp.chunker.planner import plan_cost

        for rid in request_ids:
            info = self._prefills.pop(rid, None)
            chunks = self.chunk_log.get(rid, [])
            if info is None or self.compute_model is None:
                continue
            t_first, history, mode, alone = info
            if not alone or mode == PLAN_OFF or len(chunks) < 4:
                continue
            model_s = plan_cost(self.compute_model, chunks, self.num_stages, history=history)
            self.request_gaps.append(
                (t_out - t_first - model_s) / (len(chunks) + self.num_stages - 1))
            self._unsaved = True
        self._refresh_planning_model()
        if self.metrics is not None:
            self.metrics.overhead.set(self.overhead_s())

    def _observe_interval(self, batch: list, elapsed: float, sent: SentStep | None) -> None:
        predicted = float(self.model.predict_batch(batch))
        if self.stage_timing:
            # Compute is calibrated on the workers' own timings; the interval only tells the
            # per-step overhead (kept on the step until its compute time arrives).
            self.interval_errors.append(abs(predicted - elapsed) / elapsed)
            if sent is not None:
                sent.interval = elapsed
            return
        # No per-stage timing: the interval (compute plus the engine's per-step cost) is the
        # measurement, under the same rules as stage times.
        compute = float(self.compute_model.predict_batch(batch))
        self.errors.append(abs(compute - elapsed) / elapsed)
        self.step_log.append((list(batch), compute, elapsed))
        if self.metrics is not None:
            self.metrics.prediction_error.observe(self.errors[-1])
        self._observe_compute(batch, elapsed)

    # ------------------------------------------------------------------ per-stage timing

    def _observe_stage_time(self, batch: list, measured: float, interval: float | None) -> None:
        """One prefill step's slowest-stage compute (s) from the workers, with its step interval
        (s, None if not measured)."""
        predicted = float(self.compute_model.predict_batch(batch))
        self.errors.append(abs(predicted - measured) / measured)
        self.step_log.append((list(batch), predicted, measured))
        prev, self._prev_measured = self._prev_measured, measured
        if interval is not None and prev is not None and abs(measured / prev - 1.0) <= STEADY:
            # In a full pipeline of equal steps the output interval is one step's compute plus
            # the engine's per-step overhead. When consecutive steps differ (static chunks that
            # grow with history, a mis-predicted plan) the interval also carries that
            # difference, easily 100x the overhead; those steps tell nothing about it.
            self.overheads.append(interval - measured)
        if self.metrics is not None:
            self.metrics.prediction_error.observe(self.errors[-1])
            self.metrics.step_seconds.observe(measured)
            self.metrics.overhead.set(self.overhead_s())
        self._observe_compute(batch, measured)
        self.timing.every = 1 if self.drift_suspected() else TIMING_SAMPLE_EVERY

    def drift_suspected(self) -> bool:
        """Not calibrated yet, or the recent steps' median error is above drift_threshold:
        workers then time every step."""
        return self.num_observations < REFIT_MIN_STEPS or self._recent_error_high()

    def _recent_error_high(self) -> bool:
        if len(self.errors) < DRIFT_SPAN:
            return True
        recent = list(self.errors)[-DRIFT_SPAN:]
        return statistics.median(recent) > float(self.cfg.drift_threshold)

    def _observe_compute(self, batch: list, measured: float) -> None:
        """Calibrate on one step's slowest-stage compute, in two time scales.

        Fast: the model in use is a base model times the median measured/predicted ratio of
        the recent steps (tracks a machine that got slower within a few steps).
        Slow: every `REFIT_EVERY` steps, once `REFIT_MIN_STEPS` were seen, the base model is
        refitted on the start-up profile's points plus the recent step timings. A profile of
        16 passes on a noisy machine can get the shape wrong (e.g. twice the cost of a
        4096-token chunk); real steps, hundreds of them where requests actually run, correct
        it, while the profile's points keep the fit sane where no request has run yet. Step
        timings are noisier than best-of-N profiling passes, hence looser quality gates; a
        rejected refit keeps the current model."""
        self.num_observations += 1
        self.step_samples.append((list(batch), float(measured)))
        self._unsaved = True
        base = float(self.model_base.predict_batch(batch))
        if base > 0:
            self.ratios.append(measured / base)
        drift = (self.num_observations - self._drift_refit_at >= DRIFT_SPAN
                 and len(self.step_samples) >= REFIT_MIN_STEPS and self._recent_error_high())
        if drift:  # recent steps disagree with the model: refit now, not at the next period
            self._drift_refit_at = self.num_observations
            self._drift_events += 1
            logger.info("dcpp: drift: median error of the last %d steps above "
                        "drift_threshold=%.2f; refitting", DRIFT_SPAN, self.cfg.drift_threshold)
        if drift or (len(self.step_samples) >= REFIT_MIN_STEPS
                     and self.num_observations % REFIT_EVERY == 0):
            self._refit_base()  # refills the ratios (this step's included) and rescales
        elif (len(self.ratios) >= SCALE_MIN_STEPS and not len(self.ratios) % 4
                and self._rescale(statistics.median(self.ratios))):
            self.num_refits += 1
        self._refresh_planning_model()
        if self.num_observations % 50 == 0:
            logger.info("dcpp: median chunk-latency prediction error %.1f%% over last %d steps; "
                        "base model x %.3f; per-step overhead %.2f ms", 100 * self.median_error(),
                        len(self.errors), self.compute_scale, 1e3 * self.overhead_s())

    def _refit_base(self) -> None:
        from dcpp.chunker.latency_model import FitError, HistoryLatencyModel

        samples = self.profile_samples + list(self.step_samples)
        try:
            fit = HistoryLatencyModel.fit(samples, form="full",
                                          max_median_rel_error=ONLINE_MAX_MEDIAN_ERROR,
                                          min_r2=ONLINE_MIN_R2)
        except FitError as exc:
            self.last_refit_error = str(exc)
            logger.debug("dcpp: online refit rejected (%s); keeping the current model", exc)
            return
        self.last_refit_error = None
        self.model_base = fit
        # The recent steps' ratios against the new base (not an empty window, which would
        # let the next few steps, all from one region, set the scale alone).
        self.ratios.clear()
        for batch, secs in list(self.step_samples)[-SCALE_WINDOW:]:
            base = float(fit.predict_batch(batch))
            if base > 0:
                self.ratios.append(secs / base)
        self._rescale(statistics.median(self.ratios)
                      if len(self.ratios) >= SCALE_MIN_STEPS else 1.0, force=True)
        self.num_refits += 1
        logger.debug("dcpp: refitted the latency model on %d profile points + %d step timings: "
                     "%s", len(self.profile_samples), len(self.step_samples), _fit_repr(fit))
        self._refresh_planning_model()
        if self._unsaved and time.monotonic() - self._saved_at >= calibration_store.SAVE_EVERY_S:
            self.save_calibration()

    def _rescale(self, scale: float, *, force: bool = False) -> bool:
        """Use the base model times `scale`; unless `force`, only if that moves the scale in use
        by more than 1%. Returns whether the model changed."""
        if not force and abs(scale / self.compute_scale - 1.0) <= 0.01:
            return False
        self.compute_scale = scale
        self.compute_model = self.model_base.scaled(scale) if scale != 1.0 else self.model_base
        if self.metrics is not None:
            self.metrics.scale.set(scale)
        logger.debug("dcpp: recalibrated: base model x %.3f", scale)
        return True

    # ------------------------------------------------------------------ persisted calibration

    def _restore_calibration(self, prof: Any) -> None:
        """Start from what the previous engine with this profile learnt (`calibration_store`)."""
        self._calibration_path = (calibration_store.path_for(prof.path)
                                  if prof.path and prof.source != "none" else None)
        self._profile_digest = calibration_store.profile_digest(self.profile_samples)
        if self._calibration_path is None:
            return
        if prof.source == "profiled" and os.path.exists(self._calibration_path):
            # Learnt on the profile this one replaces: obsolete.
            logger.info("dcpp: removing %s (learnt on an earlier profile)",
                        self._calibration_path)
            with contextlib.suppress(OSError):
                os.unlink(self._calibration_path)
            return
        try:
            state = calibration_store.load(self._calibration_path, cache_key=self.cache_key(),
                                           digest=self._profile_digest)
        except (OSError, ValueError) as exc:
            logger.warning("dcpp: ignoring calibration file %s (%s); calibrating afresh",
                           self._calibration_path, exc)
            return
        if not state:
            return
        self.step_samples.extend(state.step_samples)
        self.request_gaps.extend(state.request_gaps)
        self.overheads.extend(state.overheads)
        if len(self.step_samples) >= REFIT_MIN_STEPS:
            self._refit_base()
        self._refresh_planning_model()
        logger.info("dcpp: calibration loaded from %s (%d step timings, %d whole prefills); "
                    "per-step overhead %.2f ms; model %s", self._calibration_path,
                    len(state.step_samples), len(state.request_gaps), 1e3 * self.overhead_s(),
                    _fit_repr(self.model))

    def save_calibration(self) -> None:
        """Write what calibration learnt beside the profile (a warning, once, if it cannot)."""
        path = self._calibration_path
        if path is None:
            return
        state = calibration_store.CalibrationState(
            list(self.step_samples), list(self.request_gaps), list(self.overheads))
        if not state:
            return
        self._saved_at = time.monotonic()
        self._unsaved = False
        try:
            calibration_store.save(path, state, cache_key=self.cache_key(),
                                   digest=self._profile_digest)
        except OSError as exc:
            if not self._save_warned:
                self._save_warned = True
                logger.warning("dcpp: could not save calibration to %s (%s); a restart will "
                               "calibrate afresh", path, exc)

    def overhead_s(self) -> float:
        """Per-step cost beyond the slowest stage's compute (s, >= 0): from whole prefills
        once 3 planned requests ran alone (what TTFT really pays per chunk), else from steady
        step intervals."""
        if len(self.request_gaps) >= 3:
            return max(0.0, statistics.median(self.request_gaps))
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

    def _refresh_planning_model(self) -> None:
        planning = self._planning_model()
        if planning is not None and planning != self.model:
            self.set_model(planning)

    def median_error(self) -> float:
        """Median |predicted / measured - 1| of the recent steps, each predicted with the model
        in use when it ran."""
        return statistics.median(self.errors) if self.errors else float("nan")

    def close(self) -> None:
        """Save what calibration learnt; release what the runtime holds outside Python objects
        (the metrics port)."""
        if self._unsaved:
            self.save_calibration()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def forget(self, request_ids: Any) -> None:
        """Drop the plans and prefill timers of `request_ids` (None: of every request)."""
        if self.sizer is not None:
            self.sizer.forget(request_ids)
        if request_ids is None:
            self._prefills.clear()
            return
        for rid in request_ids:
            self._prefills.pop(rid, None)

    def stats(self) -> dict:
        return {
            "profile_source": self.profile_source,
            "profile_path": self.profile_path,
            "num_profile_passes": self.num_profile_passes,
            "num_observations": self.num_observations,
            "num_refits": self.num_refits,
            "median_prediction_error": self.median_error(),
            "stage_timing": self.stage_timing,
            "timed_steps": self.timing.steps_timed,
            "tracked_steps": self.timing.steps_seen,
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

    dcpp: DcppRuntime | None = None
    """None: dcpp off (also for a scheduler built without __init__, as vLLM's tests do)."""

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
            if rt.sizer is not None:
                rt.sizer.end_step()
            raise
        rt.end_step(self, out)
        return out

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        rt = self.dcpp
        if rt is None or num_new_tokens <= 1:
            return super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                      num_new_tokens)
        sized = rt.cap(self, request, int(num_computed_tokens), int(num_new_tokens))
        got = super()._reserve_prefill_lookahead(request, num_computed_tokens, sized)
        if got == 0 and sized != num_new_tokens:  # dcpp's cut fell in vLLM's lookahead window
            got = super()._reserve_prefill_lookahead(request, num_computed_tokens,
                                                     num_new_tokens)
        return got

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
        if request_ids is not None and not isinstance(request_ids, str):
            request_ids = list(request_ids)  # read twice below
        result = super().finish_requests(request_ids, finished_status)
        rt = self.dcpp
        if rt is not None:
            # Aborted (or stopped) requests: drop their plans and prefill timers.
            if request_ids is None:  # vLLM: "all requests"
                rt.forget(None)
            else:
                ids = [request_ids] if isinstance(request_ids, str) else request_ids
                rt.forget(ids + [rid for rid in rt.plans if rid not in self.requests])
        return result

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            if self.dcpp is not None:
                self.dcpp.close()


class DcppScheduler(_DcppMixin, Scheduler):
    """vLLM's scheduler with dcpp chunk sizing (`--scheduler-cls` value)."""


class DcppAsyncScheduler(_DcppMixin, AsyncScheduler):
    """vLLM's async scheduler with dcpp chunk sizing."""
