"""OnlineCalibrator: learns from step timings, never stops, bounded memory, drift."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import LLAMA8B_P4, PREFIX_HEAVY
from dcpp.chunker.calibration import OnlineCalibrator


def _steps(model, n, seed=0, noise=0.01, scale=1.0):
    """Plausible step batches: one prefill chunk, sometimes with decode tokens."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        batch = [(int(rng.integers(1, 64)) * 256, int(rng.integers(0, 400)) * 256)]
        if rng.random() < 0.3:
            batch += [(1, int(rng.integers(1000, 60000)))] * int(rng.integers(1, 4))
        t = scale * model.predict_batch(batch) * (1 + noise * rng.standard_normal())
        yield batch, t


def test_learns_from_scratch_and_keeps_learning():
    cal = OnlineCalibrator(None, window=64)
    for batch, t in _steps(PREFIX_HEAVY, 200):
        cal.observe(batch, t)
    assert cal.model is not None
    assert cal.version > 10  # vllm-ascend stops after 30 points; this keeps refitting
    for batch, _ in _steps(PREFIX_HEAVY, 20, seed=9, noise=0):
        assert cal.model.predict_batch(batch) == pytest.approx(PREFIX_HEAVY.predict_batch(batch),
                                                                rel=0.03)
    assert cal.median_error() < 0.02


def test_memory_is_bounded():
    cal = OnlineCalibrator(LLAMA8B_P4, window=32)
    for batch, t in _steps(LLAMA8B_P4, 500):
        cal.observe(batch, t)
    assert len(cal) <= 32 and len(cal.prediction_errors) <= 32


def test_drift_detected_and_model_recovers():
    cal = OnlineCalibrator(LLAMA8B_P4, window=128, drift_threshold=0.10)
    for batch, t in _steps(LLAMA8B_P4, 40):
        cal.observe(batch, t)
    assert cal.drift_events == 0
    for batch, t in _steps(LLAMA8B_P4, 60, seed=1, scale=1.5):  # the machine got 50% slower
        cal.observe(batch, t)
    assert cal.drift_events >= 1
    recent = cal.prediction_errors[-8:]
    assert np.median(np.abs(recent)) < 0.05
    assert cal.model.c == pytest.approx(1.5 * LLAMA8B_P4.c, rel=0.25)


def test_failed_refit_keeps_previous_model():
    cal = OnlineCalibrator(LLAMA8B_P4, window=32)
    for _ in range(20):  # identical steps determine nothing
        cal.observe([(4096, 0)], 0.05)
    assert cal.model is LLAMA8B_P4
    assert cal.last_fit_error is not None and "rank-deficient" in cal.last_fit_error


def test_bad_inputs():
    cal = OnlineCalibrator(None)
    with pytest.raises(ValueError, match="elapsed_s"):
        cal.observe([(10, 0)], 0.0)
    with pytest.raises(ValueError, match="batch"):
        cal.observe([(0, 5)], 0.1)
    with pytest.raises(ValueError, match="window"):
        OnlineCalibrator(None, window=4)
    with pytest.raises(ValueError, match="drift_threshold"):
        OnlineCalibrator(None, drift_threshold=float("nan"))


def test_repeat_noise_separates_noise_from_model_error():
    from dcpp.chunker.calibration import repeat_noise

    rng = np.random.default_rng(0)
    records = []
    for chunk, history in [(256, 0), (256, 4096), (512, 1024), (1024, 0)]:
        true = 1e-3 + 1e-8 * chunk * (chunk + history)
        for _ in range(9):
            # Measurements scatter +-10% around the truth; the model is 20% high on every step.
            records.append(([(chunk, history)], 1.2 * true, true * rng.uniform(0.9, 1.1)))
    records.append(([(64, 64)], 1.0, 2.0))  # seen once: not a group
    out = repeat_noise(records)
    assert out["groups"] == 4 and out["steps"] == 36
    assert 0.02 < out["noise"] < 0.08  # uniform +-10%: median |dev| ~5%
    assert abs(out["systematic"] - 0.2) < 0.05


def test_repeat_noise_without_repeats_and_bad_min():
    from dcpp.chunker.calibration import repeat_noise

    out = repeat_noise([([(8, 0)], 1.0, 1.0)])
    assert out["groups"] == 0 and math.isnan(out["noise"]) and math.isnan(out["systematic"])
    with pytest.raises(ValueError, match="min_repeats=1"):
        repeat_noise([], min_repeats=1)
