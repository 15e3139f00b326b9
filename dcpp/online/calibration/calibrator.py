"""`Calibrator`: the latency model in use, learnt from real step timings (plain Python).

One set of rules for both measurement sources: the workers' per-stage compute times, or, where
workers cannot time their stage, the step intervals. Two time scales:

- fast: the model in use is a base model times the median measured/base ratio of the last
  `SCALE_WINDOW` steps (a machine that got slower is followed within a few dozen steps; a few
  steps from one region of one prompt do not rescale every other region);
- slow: every `REFIT_EVERY` steps once `REFIT_MIN_STEPS` were seen, or at once when the median
  error of the last `DRIFT_SPAN` steps exceeds `drift_threshold`, the base model is refitted on
  the start-up profile's points plus the recent step timings (corrects a profile's wrong shape).

It also learns the engine's per-step cost beyond compute (steady step intervals, then whole
prefills of planned requests that ran alone), which the planning model adds to `c`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import statistics
from typing import Any

from dcpp.online.calibration.step_overhead import StepOverhead

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

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
"""The fast scale is the median measured/base ratio of the last `SCALE_WINDOW` steps; only at
start-up (profile vs real steps, often a global offset) do `SCALE_MIN_STEPS` suffice."""

DRIFT_SPAN = 8
"""Recent steps whose median error decides whether drift is suspected."""


class Calibrator:
    """The compute model in use and what step timings taught it."""

    def __init__(self, profile_model: Any, profile_samples: list, *, window: int,
                 drift_threshold: float, num_stages: int) -> None:
        self.profile_model = profile_model
        self.base = profile_model
        """The shape the fast scale multiplies: the profile, later its latest refit."""
        self.scale = 1.0
        self.profile_samples = list(profile_samples)
        self.samples: collections.deque[tuple[list, float]] = collections.deque(maxlen=window)
        """Recent steps: (batch of (chunk, history), measured s)."""
        self.ratios: collections.deque[float] = collections.deque(maxlen=SCALE_WINDOW)
        self.errors: collections.deque[float] = collections.deque(maxlen=window)
        """|predicted / measured - 1| of recent steps, each with the model in use then."""
        self.step_log: collections.deque[tuple[list, float, float]] = collections.deque(
            maxlen=1024)
        """(batch, predicted s, measured s) of recent steps (reports such as `make demo`)."""
        self.overhead = StepOverhead(num_stages)
        """The engine's per-step cost beyond compute."""
        self.drift_threshold = float(drift_threshold)
        self.num_observations = 0
        self.num_refits = 0
        self.drift_events = 0
        self.last_refit_error: str | None = None
        self._drift_refit_at = 0

    # ------------------------------------------------------------------ observations
    def observe(self, batch: list, measured: float, interval: float | None = None) -> float:
        """One step's measurement (s); `interval` (s) is its output interval when `measured`
        is compute only. Returns the step's relative prediction error."""
        predicted = float(self.model.predict_batch(batch))
        error = abs(predicted - measured) / measured
        self.errors.append(error)
        self.step_log.append((list(batch), predicted, measured))
        self.overhead.observe_step(measured, interval)
        self._learn(batch, measured)
        return error

    def observe_request(self, chunks: list[int], history: int, elapsed: float) -> None:
        """A planned request's whole prefill ran alone in `elapsed` s."""
        self.overhead.observe_request(self.model, chunks, history, elapsed)

    def _learn(self, batch: list, measured: float) -> None:
        self.num_observations += 1
        self.samples.append((list(batch), float(measured)))
        base = float(self.base.predict_batch(batch))
        if base > 0:
            self.ratios.append(measured / base)
        drift = (self.num_observations - self._drift_refit_at >= DRIFT_SPAN
                 and len(self.samples) >= REFIT_MIN_STEPS and self._recent_error_high())
        if drift:
            self._drift_refit_at = self.num_observations
            self.drift_events += 1
            logger.info("dcpp: drift: median error of the last %d steps above "
                        "drift_threshold=%.2f; refitting", DRIFT_SPAN, self.drift_threshold)
        if drift or (len(self.samples) >= REFIT_MIN_STEPS
                     and self.num_observations % REFIT_EVERY == 0):
            self.refit()  # refills the ratios (this step's included) and rescales
        elif (len(self.ratios) >= SCALE_MIN_STEPS and not len(self.ratios) % 4
                and self._rescale(statistics.median(self.ratios))):
            self.num_refits += 1
        if self.num_observations % 50 == 0:
            logger.info("dcpp: median chunk-latency prediction error %.1f%% over last %d steps; "
                        "base model x %.3f; per-step overhead %.2f ms", 100 * self.median_error(),
                        len(self.errors), self.scale, 1e3 * self.overhead_s())

    def refit(self) -> bool:
        """Refit the base on the profile's points plus the recent steps (looser gates than
        profiling: step timings are noisier); a rejected fit keeps the model. Returns whether
        the base changed."""
        from dcpp.chunker.latency_model import FitError, HistoryLatencyModel

        try:
            fit = HistoryLatencyModel.fit(self.profile_samples + list(self.samples), form="full",
                                          max_median_rel_error=ONLINE_MAX_MEDIAN_ERROR,
                                          min_r2=ONLINE_MIN_R2)
        except FitError as exc:
            self.last_refit_error = str(exc)
            logger.debug("dcpp: online refit rejected (%s); keeping the current model", exc)
            return False
        self.last_refit_error = None
        self.base = fit
        # The recent steps' ratios against the new base (an empty window would let the next
        # few steps, all from one region, set the scale alone).
        self.ratios.clear()
        for batch, secs in list(self.samples)[-SCALE_WINDOW:]:
            b = float(fit.predict_batch(batch))
            if b > 0:
                self.ratios.append(secs / b)
        self._rescale(statistics.median(self.ratios)
                      if len(self.ratios) >= SCALE_MIN_STEPS else 1.0, force=True)
        self.num_refits += 1
        logger.debug("dcpp: refitted the latency model on %d profile points + %d step timings",
                     len(self.profile_samples), len(self.samples))
        return True

    def _rescale(self, scale: float, *, force: bool = False) -> bool:
        """Use base x `scale`; unless `force`, only if the scale moves by more than 1%."""
        if not force and abs(scale / self.scale - 1.0) <= 0.01:
            return False
        self.scale = scale
        logger.debug("dcpp: recalibrated: base model x %.3f", scale)
        return True

    # ------------------------------------------------------------------ what it knows
    @property
    def model(self) -> Any:
        """base x scale: the model of what is measured (slowest-stage compute or intervals)."""
        return self.base.scaled(self.scale) if self.scale != 1.0 else self.base

    def _recent_error_high(self) -> bool:
        if len(self.errors) < DRIFT_SPAN:
            return True
        return statistics.median(list(self.errors)[-DRIFT_SPAN:]) > self.drift_threshold

    def drift_suspected(self) -> bool:
        """Not calibrated yet, or the recent steps' median error is above drift_threshold."""
        return self.num_observations < REFIT_MIN_STEPS or self._recent_error_high()

    def overhead_s(self) -> float:
        """Per-step cost beyond compute (s, >= 0)."""
        return self.overhead.seconds()

    def planning_model(self, *, add_overhead: bool) -> Any:
        """The model the planner needs: with `add_overhead` (the measurement was compute only)
        the per-step overhead is added to c (the fixed cost per step decides the chunk count)."""
        over = self.overhead_s() if add_overhead else 0.0
        return dataclasses.replace(self.model, c=self.model.c + over) if over > 0 else self.model

    def median_error(self) -> float:
        return statistics.median(self.errors) if self.errors else float("nan")

    def restore(self, samples: list, request_gaps: list, overheads: list) -> None:
        """Start from a previous engine's state (refits at once when it has enough steps)."""
        self.samples.extend(samples)
        self.overhead.request_gaps.extend(request_gaps)
        self.overhead.intervals.extend(overheads)
        if len(self.samples) >= REFIT_MIN_STEPS:
            self.refit()
