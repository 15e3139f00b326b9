"""`DcppRuntime`: wires dcpp's parts for one engine's scheduler (see docs/architecture.md).

Profile -> `PlanningModel` (the one owner of the model) -> predictors -> `ChunkSizer` (chunk
per request and step) -> `StepLedger` (steps in flight) -> outputs and worker timings
(`StageTiming`) -> `Calibrator` -> a new planning model. Persistence (`calibration.saver`) and
metrics observe; nothing writes back into the engine. Imports no engine: the adapter hands it
plain values (`dcpp.online.engine`).

The runtime is in one `Phase` at a time, entered only through `_enter`:

    STATIC ──> LIVE ──> CALIBRATED        (live calibration: the first fit from served steps)
    STATIC ──> CALIBRATED                 (a profile, need_timing: refined by step timings)
    STATIC ──> PROFILED                   (a profile, need_timing false: planned, never refit)
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import statistics
import time
from typing import Any

from dcpp.chunker.planning_model import PlanningModel
from dcpp.chunker.predictor import ChunkPredictor
from dcpp.online.calibration.calibrator import Calibrator
from dcpp.online.calibration.live_fit import LiveFit
from dcpp.online.calibration.saver import CalibrationSaver, save_profile
from dcpp.online.chunk_sizer import PLAN_MODES, PLAN_OFF, Ask, ChunkSizer
from dcpp.online.engine import EngineLimits, Offer, ScheduledStep, StartupProfile, WorkerChannel
from dcpp.online.prefill_log import PrefillLog
from dcpp.online import request_options
from dcpp.online.requests import RequestTable
from dcpp.online.stage_timing import StageTiming
from dcpp.online.step_ledger import LedgerEntry, StepLedger

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

TIMING_SAMPLE_EVERY = 8
"""Once calibrated, workers time (and synchronise on) 1 in this many steps."""


class Phase(enum.Enum):
    STATIC = "static"
    """No model: the engine's own chunks (a request's fixed chunk size still applies)."""
    LIVE = "live"
    """No model yet: every step timed until the timings suffice for a first fit."""
    PROFILED = "profiled"
    """Planned with the profile's model; no step timing (need_timing false)."""
    CALIBRATED = "calibrated"
    """Planned with a model that step timings keep calibrating."""


_TRANSITIONS = {(Phase.STATIC, Phase.LIVE), (Phase.STATIC, Phase.PROFILED),
                (Phase.STATIC, Phase.CALIBRATED), (Phase.LIVE, Phase.CALIBRATED)}


class DcppRuntime:
    """Chunk sizing and calibration for one engine."""

    def __init__(self, cfg: Any, limits: EngineLimits, profile: StartupProfile, *,
                 channel: WorkerChannel | None = None, metrics: Any | None = None) -> None:
        self.cfg, self.limits = cfg, limits
        self.requests = RequestTable()
        """Each request's dcpp state (one record, freed in `free`)."""
        self.planning = PlanningModel()
        """The one owner of the model dcpp plans with."""
        self.predictors = {mode: ChunkPredictor(
            dataclasses.replace(cfg, plan_mode=mode), self.planning,
            max_num_batched_tokens=limits.max_num_batched_tokens, page_size=limits.page_size,
            max_model_len=limits.max_model_len, num_stages=limits.num_stages)
            for mode in PLAN_MODES}
        spec = self.predictors[PLAN_MODES[0]].spec
        self.sizer = ChunkSizer(
            lambda mode, n, h: self.predictors[mode].plan(n, history=h), self.planning,
            self.requests, floor=spec.floor, align=spec.align, num_stages=limits.num_stages,
            opens_full=lambda mode, n, h: self.predictors[mode].opens_with_budget(n, history=h))
        self.ledger = StepLedger()
        self.timing = StageTiming(channel, limits.num_stages,
                                  window=int(cfg.calibration_window))
        self.timing.metrics = metrics  # measured bubbles
        self.prefills = PrefillLog(self.requests)
        self.profile = dataclasses.replace(profile, model=None, samples=[])
        """Where the model came from ("live" once the live fit replaced it); the model itself
        is `planning`'s, the samples the calibrator's."""
        self.saver = CalibrationSaver(profile.cache_key)
        self.metrics = metrics
        if metrics is not None:
            metrics.profile_passes.set(profile.passes)
        self.cal: Calibrator | None = None
        """The calibrator (CALIBRATED only)."""
        self.live: LiveFit | None = None
        """The live fit in progress (LIVE only)."""
        self.phase = Phase.STATIC
        if profile.model is not None:
            self._enter(Phase.CALIBRATED if cfg.need_timing else Phase.PROFILED, profile.model,
                        samples=list(profile.samples), saved_at=profile.path,
                        fresh=profile.source == "profiled")
        elif cfg.need_timing and (cfg.live_calibration or profile.unsupported):
            self._enter(Phase.LIVE)
        if metrics is not None:
            metrics.active.set(0 if self.model is None else 1)

    # ------------------------------------------------------------------ phases
    def _enter(self, phase: Phase, model: Any | None = None, *, samples: list | None = None,
               saved_at: str | None = None, fresh: bool = False) -> None:
        """The one place the runtime changes phase. `model`: the model to plan with (PROFILED,
        CALIBRATED); `samples`: the points calibration refits on; `saved_at`: the profile file
        the model is saved in (calibration is saved beside it; None: nothing is saved);
        `fresh`: the model was just measured, so a calibration file beside it is stale."""
        if (self.phase, phase) not in _TRANSITIONS:
            raise AssertionError(f"dcpp runtime: no transition {self.phase.value} -> "
                                 f"{phase.value}")
        self.phase = phase
        if phase is Phase.LIVE:
            self.live = LiveFit(window=int(self.cfg.calibration_window))
            self.timing.enable()
            logger.info("dcpp: live calibration: vLLM's static chunks, every step timed (%s), "
                        "until the timings cover enough (chunk, history) points to fit",
                        "per-stage compute" if self.stage_timing else "step intervals")
            return
        self.planning.set(model)
        if phase is Phase.PROFILED:
            return
        self.live = None
        self.cal = Calibrator(model, samples or [], window=int(self.cfg.calibration_window),
                              drift_threshold=float(self.cfg.drift_threshold),
                              num_stages=self.limits.num_stages)
        if not self.timing.on:
            self.timing.enable()
        state = self.saver.bind(saved_at, self.cal, fresh=fresh)
        if state is not None:
            self.cal.restore(state.step_samples, state.request_gaps, state.overheads)
            logger.info("dcpp: calibration loaded from %s (%d step timings, %d whole "
                        "prefills); per-step overhead %.2f ms; model %s", self.saver.path,
                        len(state.step_samples), len(state.request_gaps),
                        1e3 * self.cal.overhead_s(), _fit_repr(self.cal.model))
        self._refresh_planning_model()

    def _live_fitted(self, model: Any) -> None:
        """LIVE -> CALIBRATED: plan with the live fit from now on; calibration starts from it
        and its steps, and the fit is cached as this engine's profile (a restart plans at
        once)."""
        live = self.live
        points = live.profile_samples()
        self.prefills.start_unmeasured(time.monotonic())  # prefills begun before
        saved = save_profile(self.profile.path, self.profile.cache_key, model, points,
                             len(live.samples))
        self.profile = dataclasses.replace(self.profile, source="live")
        self._enter(Phase.CALIBRATED, model, samples=[([(c, h)], s) for c, h, s in points],
                    saved_at=self.profile.path if saved else None, fresh=True)
        if self.metrics is not None:
            self.metrics.active.set(1)
        logger.info("dcpp: live calibration: fitted %s on %d prefill steps (%d fits tried)%s; "
                    "dynamic chunking on", _fit_repr(model), len(live.samples), live.num_fits,
                    f"; saved as the profile {self.profile.path}" if saved else "")

    # ------------------------------------------------------------------ views
    @property
    def model(self) -> Any | None:
        """The planning model in use (`planning`'s)."""
        return self.planning.model

    @property
    def chunk_log(self) -> collections.OrderedDict[str, list[int]]:
        """Executed prefill chunk sizes per request (most recent requests)."""
        return self.requests.chunk_log

    @property
    def plan_log(self) -> collections.OrderedDict[str, list[tuple[int, list[int]]]]:
        """Every plan dcpp made per request: (start history, chunks as planned)."""
        return self.requests.plan_log

    @property
    def stage_timing(self) -> bool:
        """Whether calibration measures the workers' per-stage step times."""
        return self.timing.on

    def _refresh_planning_model(self) -> None:
        self.planning.set(self.cal.planning_model(add_overhead=self.stage_timing))
        if self.metrics is not None:
            self.metrics.scale.set(self.cal.scale)
            self.metrics.overhead.set(self.cal.overhead_s())

    # ------------------------------------------------------------------ scheduling
    def begin_step(self, prefill_room: int, pending: Any = None) -> None:
        """A step starts: its prefills may take `prefill_room` tokens (the budget less the
        decodes); `pending()` lists (request id, tokens left, history) of the prefills still
        to run (read lazily, at most once)."""
        self.sizer.begin_step(prefill_room, pending)

    def abort_step(self) -> None:
        self.sizer.end_step()

    def cap(self, offer: Offer) -> int:
        """Chunk for the request this step: in [1, `offer.offered`] (the engine's number)."""
        if not self.sizer.in_step or offer.offered <= 1:
            return offer.offered
        state = self.requests.record(offer.request_id)
        return self.sizer.size(Ask(
            request_id=offer.request_id,
            mode=request_options.plan_mode(state, offer.plan_arg, self.cfg.plan_mode),
            total=offer.total, history=offer.history, offered=offer.offered,
            encoder_spans=offer.encoder_spans, block_align=offer.block_align,
            fixed=request_options.fixed_chunk(state, offer.chunk_arg)))

    def commit(self, request_id: str, history: int, tokens: int) -> None:
        """The engine really scheduled `tokens` (0: none) of the request it just asked about."""
        self.sizer.commit(request_id, history, tokens)

    def uncommit(self, request_id: str) -> None:
        """The engine took the request out of this step again (preempted it)."""
        self.sizer.uncommit(request_id)

    def end_step(self, step: ScheduledStep) -> None:
        """The step the engine scheduled: advance plans, log chunks, put it in the ledger."""
        self.abort_step()
        now = time.monotonic()
        batch: list[tuple[int, int]] = []
        finishing: list[str] = []
        prefills: dict[str, tuple[int, int]] = {}  # for the measured bubbles
        labels: dict[str, str] = {}
        for r in step.requests:
            batch.append((r.tokens, r.history))
            if not r.prefill:
                continue
            rid = r.request_id
            prefills[rid] = (r.tokens, r.history)
            if self.cal is not None and not self.prefills.is_timed(rid):
                state = self.requests.record(rid)
                mode = request_options.plan_mode(state, r.plan_arg, self.cfg.plan_mode)
                self.prefills.start(rid, now, r.history, measured=mode != PLAN_OFF)
                fixed = request_options.fixed_chunk(state, r.chunk_arg) is not None
                labels[rid] = "fixed" if fixed else mode
            if self.metrics is not None:
                self.metrics.chunk_tokens.observe(r.tokens)
            self.prefills.ran(rid, r.tokens)
            self.sizer.advance(rid, r.history, r.tokens)
            if r.history + r.tokens >= r.total:
                finishing.append(rid)
                state = self.requests.record(rid)
                state.plan = state.deferred_from = None
                logger.debug("dcpp: request %s prefill chunks %s", rid, state.chunks)
        if self.phase not in (Phase.LIVE, Phase.CALIBRATED) or not batch:
            return
        if len(batch) > 1:
            self.prefills.shared(prefills)
        sent = self.timing.track(step.fingerprint, batch, bool(prefills), prefills=prefills,
                                 finishing=finishing, labels=labels)
        closed = self.prefills.close(finishing) if self.cal is not None else []
        self.ledger.push(LedgerEntry(sent.fingerprint, now, batch, bool(prefills), finishing,
                                     sent, closed))

    def free(self, request_ids: Any) -> None:
        """The engine freed `request_ids` (finished or aborted; None: every request): their
        records go, and so do their open bubble windows."""
        self.requests.free(request_ids)
        self.timing.forget(request_ids)

    # ------------------------------------------------------------------ measurements
    def on_output(self, fingerprint: int, t_out: float, idle: bool = False) -> None:
        """The output of step `fingerprint` came back at `t_out` (monotonic s)."""
        if self.phase not in (Phase.LIVE, Phase.CALIBRATED):
            return
        entry, interval = self.ledger.returned(fingerprint, t_out)
        if interval is not None:
            if not self.stage_timing:
                self._measured(entry.batch, interval, None)  # the interval is the measurement
            elif self.phase is Phase.CALIBRATED:
                # Compute comes from the workers; the interval only tells the per-step overhead
                # (kept on the step until its compute time arrives).
                predicted = float(self.model.predict_batch(entry.batch))
                self.timing.interval_errors.append(abs(predicted - interval) / interval)
                entry.sent.interval = interval
        if self.stage_timing:
            self.timing.poll(idle, self._stage_measured,
                             returned=entry.sent if entry is not None else None)
        if self.phase is Phase.CALIBRATED:
            if entry is not None and entry.finishing:
                self._observe_requests(entry.closed, t_out)
            if idle:
                self.saver.idle(self.cal)

    def _stage_measured(self, batch: list, measured: float, interval: float | None) -> None:
        self._measured(batch, measured, interval)
        if self.phase is Phase.CALIBRATED:
            if self.metrics is not None:
                self.metrics.step_seconds.observe(measured)
            self.timing.every = 1 if self.cal.drift_suspected() else TIMING_SAMPLE_EVERY

    def _measured(self, batch: list, measured: float, interval: float | None) -> None:
        """A prefill step's measurement: the live fit's (LIVE) or the calibrator's."""
        if self.phase is Phase.LIVE:
            model = self.live.observe(batch, measured)
            if model is not None:
                self._live_fitted(model)
            return
        refits = self.cal.num_refits
        error = self.cal.observe(batch, measured, interval)
        if self.metrics is not None:
            self.metrics.prediction_error.observe(error)
        self._refresh_planning_model()
        self.saver.learnt(self.cal, refitted=self.cal.num_refits > refits)

    def _observe_requests(self, closed: list, t_out: float) -> None:
        """Whole prefills of planned requests that ran alone teach the per-step cost the
        planner charges for every extra chunk (turnaround, hand-offs, jitter), which per-step
        compute timings cannot see."""
        for whole in self.prefills.measure(closed, t_out):
            self.cal.observe_request(whole.chunks, whole.history, whole.elapsed_s)
            self.saver.learnt(self.cal, refitted=False)
        self._refresh_planning_model()

    # ------------------------------------------------------------------ persistence, reports
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
        cal = self.cal
        return {
            "phase": self.phase.value,
            "profile_source": self.profile.source, "profile_path": self.profile.path,
            "num_profile_passes": self.profile.passes,
            "num_observations": cal.num_observations if cal else 0,
            "num_refits": cal.num_refits if cal else 0,
            "median_prediction_error": cal.median_error() if cal else float("nan"),
            "stage_timing": self.stage_timing,
            "timed_steps": self.timing.steps_timed, "tracked_steps": self.timing.steps_seen,
            "overhead_s": cal.overhead_s() if cal else 0.0,
            "median_interval_error": (statistics.median(self.timing.interval_errors)
                                      if self.timing.interval_errors else float("nan")),
            "model": _fit_repr(self.model),
            "bubbles": self.timing.bubble_summary(),
        }


def _fit_repr(model: Any) -> Any:
    return None if model is None else model.to_dict()
