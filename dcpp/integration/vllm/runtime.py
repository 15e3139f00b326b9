"""`DcppRuntime`: wires dcpp's parts for one vLLM scheduler (see docs/architecture.md).

Profile -> predictors -> `ChunkSizer` (chunk per request and step) -> `StepLedger` (steps in
flight) -> outputs and worker timings (`StageTiming`) -> `Calibrator` -> a new model for the
predictors. Persistence (`calibration_store`) and metrics observe; nothing writes back into
vLLM. Imports no vLLM module: everything it reads from vLLM goes through `vllm_compat`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import statistics
import time
from typing import Any

from dcpp.integration.vllm import vllm_compat
from dcpp.integration.vllm.calibration_saver import CalibrationSaver
from dcpp.integration.vllm.calibrator import Calibrator
from dcpp.integration.vllm.chunk_sizer import PLAN_MODES, PLAN_OFF, Ask, ChunkSizer
from dcpp.integration.vllm.live_fit import LiveFit
from dcpp.integration.vllm.metrics import start_metrics
from dcpp.integration.vllm.prefill_log import PrefillLog
from dcpp.integration.vllm.request_options import RequestOptions
from dcpp.integration.vllm.stage_timing import SentStep, StageTiming
from dcpp.integration.vllm.startup_profile import (
    EngineLimits,
    StartupProfile,
    load_or_profile,
    save_live_profile,
)
from dcpp.integration.vllm.startup_profile import cache_key as profile_cache_key
from dcpp.integration.vllm.step_ledger import LedgerEntry, StepLedger

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

TIMING_SAMPLE_EVERY = 8
"""Once calibrated, workers time (and synchronise on) 1 in this many steps."""


class DcppRuntime:
    """Chunk sizing and calibration for one engine."""

    def __init__(self, vllm_config: Any, cfg: Any, *, executor: Any | None) -> None:
        self.cfg, self.vllm_config = cfg, vllm_config
        self.limits = EngineLimits.from_vllm_config(vllm_config)
        self.options = RequestOptions(cfg.plan_mode)
        self.predictors: dict[str, Any] = {}
        self.sizer: ChunkSizer | None = None
        self.ledger = StepLedger()
        self.timing = StageTiming(vllm_config, executor)
        self.prefills = PrefillLog()
        self.interval_errors: collections.deque[float] = collections.deque(
            maxlen=int(cfg.calibration_window))
        """With stage timing: the interval's error (reported only; it carries the overhead)."""

        prof = load_or_profile(vllm_config, cfg, executor)
        self.profile: StartupProfile = prof
        """Where the profile came from ("live" once the live fit replaced it)."""
        self.model: Any | None = prof.model
        """The planning model in use."""
        self.saver = CalibrationSaver(profile_cache_key(vllm_config, cfg))
        self.metrics = start_metrics(
            int(cfg.metrics_port),
            rank=int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0))
        self.timing.metrics = self.metrics  # measured bubbles
        if self.metrics is not None:
            self.metrics.profile_passes.set(self.num_profile_passes)
            self.metrics.active.set(1 if self.model is not None else 0)
        self.cal: Calibrator | None = None
        """Calibration on step timings (need_timing with a model), else None."""
        if cfg.need_timing and self.model is not None:
            self.cal = Calibrator(self.model, list(prof.samples),
                                  window=int(cfg.calibration_window),
                                  drift_threshold=float(cfg.drift_threshold),
                                  num_stages=self.num_stages)
            self.timing.enable()
            self._restore_calibration(prof)
        self._build_predictors()
        self.live: LiveFit | None = None
        """Live calibration (static chunks until step timings suffice for a fit), else None."""
        if self.model is None and cfg.need_timing and (cfg.live_calibration or prof.unsupported):
            self._start_live_calibration()

    # ------------------------------------------------------------------ views
    @property
    def num_stages(self) -> int:
        return self.limits.num_stages

    @property
    def profile_source(self) -> str:
        return self.profile.source

    @property
    def profile_path(self) -> str | None:
        return self.profile.path

    @property
    def num_profile_passes(self) -> int:
        return self.profile.passes

    @property
    def chunk_log(self) -> collections.OrderedDict[str, list[int]]:
        """Executed prefill chunk sizes per request (most recent requests)."""
        return self.prefills.chunks

    @property
    def stage_timing(self) -> bool:
        """Whether calibration measures the workers' per-stage step times."""
        return self.timing.on

    @stage_timing.setter
    def stage_timing(self, on: bool) -> None:
        self.timing.on = on

    @property
    def calibrating(self) -> bool:
        return self.cal is not None

    @property
    def compute_model(self) -> Any | None:
        """The model of what is measured (slowest-stage compute, or intervals)."""
        return self.cal.model if self.cal is not None else None

    @property
    def step_log(self) -> Any:
        return self.cal.step_log if self.cal is not None else ()

    @property
    def num_observations(self) -> int:
        return self.cal.num_observations if self.cal is not None else 0

    @property
    def num_refits(self) -> int:
        return self.cal.num_refits if self.cal is not None else 0

    def median_error(self) -> float:
        return self.cal.median_error() if self.cal is not None else float("nan")

    def overhead_s(self) -> float:
        return self.cal.overhead_s() if self.cal is not None else 0.0

    @property
    def plans(self) -> dict:
        return self.sizer.plans if self.sizer is not None else {}

    @property
    def plan_log(self) -> dict:
        return self.sizer.plan_log if self.sizer is not None else {}

    # ------------------------------------------------------------------ model
    def _build_predictors(self) -> None:
        from dcpp.chunker.predictor import ChunkPredictor

        self.predictors, self.sizer = {}, None
        if self.model is None:
            return
        for mode in PLAN_MODES:
            self.predictors[mode] = ChunkPredictor(
                dataclasses.replace(self.cfg, plan_mode=mode), self.model,
                max_num_batched_tokens=self.limits.max_num_batched_tokens,
                page_size=self.limits.page_size, max_model_len=self.limits.max_model_len,
                num_stages=self.num_stages)
        spec = self.predictors[PLAN_MODES[0]].spec
        self.sizer = ChunkSizer(
            lambda mode, n, h: self.predictors[mode].plan(n, history=h),
            floor=spec.floor, align=spec.align, num_stages=self.num_stages,
            opens_full=lambda mode, n, h: self.predictors[mode].opens_with_budget(n, history=h))
        self.sizer.model = self.model

    def set_model(self, model: Any) -> None:
        """Plan with `model` from now on (plans in flight are continued)."""
        self.model = model
        for p in self.predictors.values():
            p.set_model(model)
        if self.sizer is not None:
            self.sizer.model = model

    def _refresh_planning_model(self) -> None:
        if self.cal is None:
            return
        planning = self.cal.planning_model(add_overhead=self.stage_timing)
        if planning != self.model:
            self.set_model(planning)
        if self.metrics is not None:
            self.metrics.scale.set(self.cal.scale)
            self.metrics.overhead.set(self.cal.overhead_s())

    # ------------------------------------------------------------------ scheduling
    def begin_step(self, scheduler: Any) -> None:
        if self.sizer is not None:
            self.sizer.begin_step(vllm_compat.step_token_budget(scheduler)
                                  - vllm_compat.decode_tokens(scheduler),
                                  lambda: vllm_compat.pending_prefills(scheduler))

    def abort_step(self) -> None:
        if self.sizer is not None:
            self.sizer.end_step()

    def cap(self, scheduler: Any, request: Any, history: int, offered: int) -> int:
        """Chunk for `request` this step: in [1, `offered`] (vLLM's own number)."""
        sizer = self.sizer
        if sizer is None or not sizer.in_step or offered <= 1:
            return offered
        return sizer.size(Ask(
            request_id=request.request_id, mode=self.options.mode(request),
            total=vllm_compat.request_num_tokens(request), history=int(history),
            offered=int(offered),
            encoder_spans=vllm_compat.unsplittable_encoder_spans(scheduler, request),
            block_align=vllm_compat.mamba_block_align(scheduler),
            fixed=self.options.fixed_chunk(request)))

    def end_step(self, scheduler: Any, out: Any) -> None:
        """The step vLLM scheduled: advance plans, log chunks, put it in the ledger."""
        self.abort_step()
        now = time.monotonic()
        batch: list[tuple[int, int]] = []
        finishing: list[str] = []
        prefills: dict[str, tuple[int, int]] = {}  # for the measured bubbles
        labels: dict[str, str] = {}
        has_prefill = False
        for rid, n, history, prefill, total in vllm_compat.scheduled_requests(scheduler, out):
            batch.append((n, history))
            if not prefill:
                continue
            has_prefill = True
            prefills[rid] = (n, history)
            if self.cal is not None and rid not in self.prefills:
                request = vllm_compat.live_request(scheduler, rid)
                mode = self.options.mode(request)
                self.prefills.start(rid, now, history, measured=mode != PLAN_OFF)
                labels[rid] = "fixed" if self.options.fixed_chunk(request) is not None else mode
            if self.metrics is not None:
                self.metrics.chunk_tokens.observe(n)
            self.prefills.ran(rid, n)
            if self.sizer is not None:
                self.sizer.advance(rid, history, n)
            if history + n >= total:
                finishing.append(rid)
                self.forget_plan(rid)
                logger.debug("dcpp: request %s prefill chunks %s", rid, self.chunk_log[rid])
        if (self.cal is None and self.live is None) or not batch:
            return
        if len(batch) > 1:
            self.prefills.shared(out.num_scheduled_tokens)
        sent = self.timing.track(out, batch, has_prefill, prefills=prefills, finishing=finishing,
                                 labels=labels)
        self.ledger.push(LedgerEntry(sent.fingerprint, now, batch, has_prefill, finishing, sent))

    def forget_plan(self, request_id: str) -> None:
        if self.sizer is not None:
            self.sizer.forget([request_id])

    def forget(self, request_ids: Any) -> None:
        """Drop the plans and prefill timers of `request_ids` (None: of every request)."""
        if self.sizer is not None:
            self.sizer.forget(request_ids)
        self.timing.forget(request_ids)
        self.prefills.forget(request_ids)

    # ------------------------------------------------------------------ measurements
    def on_output(self, scheduler_output: Any, t_out: float, idle: bool = False) -> None:
        """A step's output came back at `t_out` (monotonic s)."""
        if self.cal is None:
            if self.live is not None:
                self._live_output(scheduler_output, t_out, idle)
            return
        entry, interval = self.ledger.returned(vllm_compat.step_fingerprint(scheduler_output),
                                               t_out)
        if interval is not None:
            self._observe_interval(entry.batch, interval, entry.sent)
        if self.stage_timing:
            self.timing.poll(idle, self._observe_stage_time,
                             returned=entry.sent if entry is not None else None)
        if entry is not None and entry.finishing:
            self._observe_requests(entry.finishing, t_out)
        if idle:
            self.saver.idle(self.cal)

    def _observe_interval(self, batch: list, elapsed: float, sent: SentStep) -> None:
        if self.stage_timing:
            # Compute comes from the workers; the interval only tells the per-step overhead
            # (kept on the step until its compute time arrives).
            predicted = float(self.model.predict_batch(batch))
            self.interval_errors.append(abs(predicted - elapsed) / elapsed)
            sent.interval = elapsed
            return
        self._observe(batch, elapsed, None)  # the interval is the measurement

    def _observe_stage_time(self, batch: list, measured: float, interval: float | None) -> None:
        self._observe(batch, measured, interval)
        if self.metrics is not None:
            self.metrics.step_seconds.observe(measured)
        self.timing.every = 1 if self.cal.drift_suspected() else TIMING_SAMPLE_EVERY

    def _observe(self, batch: list, measured: float, interval: float | None) -> None:
        refits = self.cal.num_refits
        error = self.cal.observe(batch, measured, interval)
        if self.metrics is not None:
            self.metrics.prediction_error.observe(error)
        self._refresh_planning_model()
        self.saver.learnt(self.cal, refitted=self.cal.num_refits > refits)

    def _observe_requests(self, request_ids: list[str], t_out: float) -> None:
        """Whole prefills of planned requests that ran alone teach the per-step cost the
        planner charges for every extra chunk (turnaround, hand-offs, jitter), which per-step
        compute timings cannot see."""
        for whole in self.prefills.finish(request_ids, t_out):
            self.cal.observe_request(whole.chunks, whole.history, whole.elapsed_s)
            self.saver.learnt(self.cal, refitted=False)
        self._refresh_planning_model()

    # ------------------------------------------------------------------ live calibration
    def _start_live_calibration(self) -> None:
        self.live = LiveFit(window=int(self.cfg.calibration_window))
        self.timing.enable()
        logger.info("dcpp: live calibration: vLLM's static chunks, every step timed (%s), "
                    "until the timings cover enough (chunk, history) points to fit",
                    "per-stage compute" if self.stage_timing else "step intervals")

    def _live_output(self, scheduler_output: Any, t_out: float, idle: bool) -> None:
        """`on_output` before the live fit: timings go to `self.live` (same sources and
        interval rule as calibration)."""
        entry, interval = self.ledger.returned(vllm_compat.step_fingerprint(scheduler_output),
                                               t_out)
        if self.stage_timing:
            self.timing.poll(idle, self._observe_live,
                             returned=entry.sent if entry is not None else None)
        elif interval is not None:
            self._observe_live(entry.batch, interval, None)

    def _observe_live(self, batch: list, measured: float, interval: float | None) -> None:
        if self.cal is not None:  # switched earlier in this same drain
            self._observe_stage_time(batch, measured, interval)
            return
        model = self.live.observe(batch, measured)
        if model is not None:
            self._switch_to_dynamic(model)

    def _switch_to_dynamic(self, model: Any) -> None:
        """Plan with the live fit from now on: calibration starts from it and its steps, the
        fit is cached as this engine's profile (a restart plans at once)."""
        live, self.live = self.live, None
        points = live.profile_samples()
        self.prefills.start_unmeasured(time.monotonic())  # prefills begun before
        self.model = model
        self.profile = dataclasses.replace(self.profile, model=model, source="live")
        self.cal = Calibrator(model, [([(c, h)], s) for c, h, s in points],
                              window=int(self.cfg.calibration_window),
                              drift_threshold=float(self.cfg.drift_threshold),
                              num_stages=self.num_stages)
        saved = save_live_profile(self.vllm_config, self.cfg, self.profile_path, model, points,
                                  len(live.samples))
        if saved:  # calibration is saved beside it (an older calibration file is removed)
            self._restore_calibration(StartupProfile(model, "profiled", self.profile_path, 0))
        self._build_predictors()
        self._refresh_planning_model()
        if self.metrics is not None:
            self.metrics.active.set(1)
        logger.info("dcpp: live calibration: fitted %s on %d prefill steps (%d fits tried)%s; "
                    "dynamic chunking on", _fit_repr(model), len(live.samples), live.num_fits,
                    f"; saved as the profile {self.profile_path}" if saved else "")

    # ------------------------------------------------------------------ persistence
    def _restore_calibration(self, prof: Any) -> None:
        """Start from what the previous engine with this profile learnt (`calibration_store`)."""
        state = self.saver.load(prof, self.cal)
        if state is None:
            return
        self.cal.restore(state.step_samples, state.request_gaps, state.overheads)
        self._refresh_planning_model()
        logger.info("dcpp: calibration loaded from %s (%d step timings, %d whole prefills); "
                    "per-step overhead %.2f ms; model %s", self.saver.path,
                    len(state.step_samples), len(state.request_gaps), 1e3 * self.overhead_s(),
                    _fit_repr(self.model))

    def save_calibration(self) -> None:
        """Write what calibration learnt beside the profile (a warning, once, if it cannot)."""
        self.saver.save(self.cal)

    def close(self) -> None:
        """Save what calibration learnt; release the metrics port."""
        self.saver.close(self.cal)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def stats(self) -> dict:
        return {
            "profile_source": self.profile_source, "profile_path": self.profile_path,
            "num_profile_passes": self.num_profile_passes,
            "num_observations": self.num_observations, "num_refits": self.num_refits,
            "median_prediction_error": self.median_error(),
            "stage_timing": self.stage_timing,
            "timed_steps": self.timing.steps_timed, "tracked_steps": self.timing.steps_seen,
            "overhead_s": self.overhead_s(),
            "median_interval_error": (statistics.median(self.interval_errors)
                                      if self.interval_errors else float("nan")),
            "model": _fit_repr(self.model),
            "bubbles": self.timing.bubble_summary(),
        }


def _fit_repr(model: Any) -> Any:
    return None if model is None else model.to_dict()
