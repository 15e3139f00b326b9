"""The noise floor of step timings. The online calibration itself (fast scale, periodic and
drift refits on step timings from either measurement source) is
`dcpp.online.calibration.calibrator.Calibrator`, which `dcpp.online.runtime.DcppRuntime`
feeds; `repeat_noise` separates a prediction error from the noise of the measurements (e.g. on
the calibrator's `step_log`, as `benchmarks/vllm_ttft.py` does)."""

from __future__ import annotations

import math

import numpy as np



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
