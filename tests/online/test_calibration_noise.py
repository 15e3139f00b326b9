"""repeat_noise: the noise floor of repeated steps vs the model's error."""

from __future__ import annotations

import math

import numpy as np
import pytest



def test_repeat_noise_separates_noise_from_model_error():
    from dcpp.online.calibration.noise import repeat_noise

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
    from dcpp.online.calibration.noise import repeat_noise

    out = repeat_noise([([(8, 0)], 1.0, 1.0)])
    assert out["groups"] == 0 and math.isnan(out["noise"]) and math.isnan(out["systematic"])
    with pytest.raises(ValueError, match="min_repeats=1"):
        repeat_noise([], min_repeats=1)
