"""Online calibration: refit the history latency model from real step timings.

Unlike vllm-ascend (which stops after 30 points), learning never stops: the last ``window``
steps are kept (bounded memory), the model is refitted every ``refit_every`` steps, and when
the median relative error of the most recent steps exceeds ``drift_threshold`` (the machine
got slower, another tenant appeared) older timings are dropped and the model refitted from
the recent ones alone. A failed refit keeps the previous model and records why.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from dcpp.chunker.latency_model import Batch, FitError, HistoryLatencyModel


class OnlineCalibrator:
    """Sliding-window refit of a `HistoryLatencyModel` from ``observe`` calls."""

    def __init__(self, model: HistoryLatencyModel | None, *, window: int = 256,
                 drift_threshold: float = 0.10, min_points: int = 8, refit_every: int = 8,
                 drift_span: int = 8) -> None:
        if window < min_points or min_points < 6:
            raise ValueError(
                f"need window >= min_points >= 6 (5 coefficients + 1), got window={window}, "
                f"min_points={min_points}"
            )
        if not (drift_threshold > 0 and math.isfinite(drift_threshold)):
            raise ValueError(f"drift_threshold={drift_threshold!r} must be a finite number > 0")
        if refit_every < 1 or drift_span < 1:
            raise ValueError(f"refit_every={refit_every} and drift_span={drift_span} must be >= 1")
        self._model = model
        self.window = window
        self.drift_threshold = drift_threshold
        self.min_points = min_points
        self.refit_every = refit_every
        self.drift_span = drift_span
        self._samples: deque[tuple[tuple[tuple[int, int], ...], float]] = deque(maxlen=window)
        self._errors: deque[float] = deque(maxlen=window)
        self._since_refit = 0
        self._since_model = 0  # errors recorded with the current model
        self._drift_pending = False  # drift seen, refit not yet succeeded
        self.version = 0
        """Increments on every successful refit (push the model to the predictor when it moves)."""
        self.drift_events = 0
        """How many times drift was detected."""
        self.last_fit_error: str | None = None
        """Reason of the last rejected refit (None after a successful one)."""

    @property
    def model(self) -> HistoryLatencyModel | None:
        return self._model

    @property
    def prediction_errors(self) -> list[float]:
        """Relative errors (predicted/observed - 1) of the current model on recent steps."""
        return list(self._errors)

    def median_error(self) -> float:
        """Median absolute relative error over the recent steps (nan before any)."""
        return float(np.median(np.abs(self._errors))) if self._errors else math.nan

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, batch: Batch, elapsed_s: float) -> None:
        """Record one step that ran ``batch`` = [(chunk, history), ...] in ``elapsed_s``."""
        if not (isinstance(elapsed_s, (int, float)) and math.isfinite(elapsed_s) and elapsed_s > 0):
            raise ValueError(f"elapsed_s={elapsed_s!r} must be a finite number of seconds > 0")
        batch = tuple((int(c), int(h)) for c, h in batch)
        if not batch or any(c <= 0 or h < 0 for c, h in batch):
            raise ValueError(f"batch={batch!r} needs (chunk > 0, history >= 0) pairs")
        if self._model is not None:
            self._errors.append(self._model.predict_batch(batch) / elapsed_s - 1.0)
            self._since_model += 1
        self._samples.append((batch, float(elapsed_s)))
        self._since_refit += 1
        recent = list(self._errors)[-self.drift_span:]
        drifted = (not self._drift_pending and self._since_model >= self.drift_span
                   and float(np.median(np.abs(recent))) > self.drift_threshold)
        if drifted:
            # The recent steps disagree with the model: forget what came before them.
            self.drift_events += 1
            self._drift_pending = True
            keep = list(self._samples)[-self.drift_span:]
            self._samples.clear()
            self._samples.extend(keep)
            self._refit()
        elif self._since_refit >= self.refit_every:
            self._refit()

    def _refit(self) -> None:
        self._since_refit = 0
        if len(self._samples) < self.min_points:
            return
        try:
            model = HistoryLatencyModel.fit(list(self._samples))
        except FitError as e:
            self.last_fit_error = str(e)
            return
        self._model = model
        self._since_model = 0
        self._drift_pending = False
        self.last_fit_error = None
        self.version += 1


def repeat_noise(records, min_repeats: int = 3) -> dict:
    """How much of a prediction error is noise: the same step measured several times.

    records: [(batch, predicted_s, measured_s), ...], e.g. a runtime's step log, where a
    batch is [(chunk, history), ...]. Steps with an identical batch that ran at least
    ``min_repeats`` times form a group. Returns
      ``noise``: median |measured / group median - 1| (no model can predict one step better),
      ``systematic``: median over groups of |median predicted / median measured - 1| (the
        model's error once the noise is averaged out),
      ``groups`` and ``steps``: how many groups and steps these medians cover (nan when none).
    """
    if min_repeats < 2:
        raise ValueError(f"min_repeats={min_repeats} must be >= 2 to measure a spread")
    groups: dict[tuple, tuple[list[float], list[float]]] = {}
    for batch, predicted, measured in records:
        key = tuple((int(c), int(h)) for c, h in batch)
        preds, meas = groups.setdefault(key, ([], []))
        preds.append(float(predicted))
        meas.append(float(measured))
    devs, sys_errs, steps = [], [], 0
    for preds, meas in groups.values():
        if len(meas) < min_repeats:
            continue
        mid = float(np.median(meas))
        devs.extend(abs(m / mid - 1.0) for m in meas)
        sys_errs.append(abs(float(np.median(preds)) / mid - 1.0))
        steps += len(meas)
    return {
        "noise": float(np.median(devs)) if devs else math.nan,
        "systematic": float(np.median(sys_errs)) if sys_errs else math.nan,
        "groups": len(sys_errs),
        "steps": steps,
    }
