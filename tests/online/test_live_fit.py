"""`live_fit.LiveFit`: collection, readiness and fit of live calibration, on hand-made step
timings from a known model (no vLLM, no engine)."""

from __future__ import annotations

import pytest

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.online.calibration.live_fit import LiveFit, ReadinessRule

BUDGET = 512
TRUE = HistoryLatencyModel(alpha=3.5e-9, beta=2.6e-8, gamma=5.2e-5, delta=1e-7, c=3.9e-3)
"""A stage: ~4 ms per step, attention to the prefix dominating long histories."""


def static_steps(prompt_lens, model=TRUE, noise=0.0):
    """vLLM's static chunking of each prompt in turn: budget-sized chunks, then the rest;
    (batch, seconds) per step, with a deterministic +-`noise` wobble."""
    steps, i = [], 0
    for n in prompt_lens:
        h = 0
        while h < n:
            c = min(BUDGET, n - h)
            wobble = 1.0 + noise * ((i * 7919) % 11 - 5) / 5
            steps.append(([(c, h)], model.predict_time(c, h) * wobble))
            h, i = h + c, i + 1
    return steps


# Remainders 40, 100, 200, 300, 450, 70: small chunks down to < budget/4, histories up to 5120.
PROMPTS = [2600, 1636, 3272, 1324, 5570, 2118, 4166, 3142]


def feed(fit, steps):
    model = None
    for batch, secs in steps:
        model = fit.observe(batch, secs) or model
    return model


def test_too_few_steps_are_not_ready():
    fit = LiveFit()
    assert feed(fit, static_steps(PROMPTS)[:20]) is None
    assert fit.num_fits == 0 and "20/32 prefill steps" in fit.missing()


def test_uniform_chunks_are_not_ready_however_many():
    """A hundred budget-sized chunks over many histories (every prompt a multiple of the
    budget): C^2, C and 1 cannot be told apart, nor C*H from H."""
    fit = LiveFit()
    assert feed(fit, static_steps([4 * BUDGET] * 25)) is None
    assert fit.num_steps == 100 and fit.num_fits == 0
    lacks = fit.missing()
    assert "1/4 distinct chunk sizes" in lacks and "chunk sizes <= half" in lacks
    assert "1/2 chunk sizes after a history > 0" in lacks


def test_no_history_is_not_ready():
    """Short prompts only (one chunk each, varied sizes): no history, so no attention-to-prefix
    term; vLLM keeps its chunks (such prompts are one chunk either way)."""
    fit = LiveFit()
    assert feed(fit, [([(c, 0)], TRUE.predict_time(c, 0)) for c in range(40, 512, 8)]) is None
    assert "0/8 chunks after a history > 0" in fit.missing()


def test_large_chunks_only_are_not_ready():
    """Remainders all above a quarter of the budget: the small chunks dynamic chunking makes
    would be extrapolated."""
    fit = LiveFit()
    assert feed(fit, static_steps([BUDGET * k + 200 + 10 * k for k in range(2, 10)])) is None
    assert "a chunk <= 0.25 x the largest" in fit.missing()


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_enough_points_fit_the_known_model(noise):
    fit = LiveFit()
    steps = static_steps(PROMPTS, noise=noise)
    model, used = None, 0
    for batch, secs in steps:  # the first step at which it is ready and fits
        used += 1
        model = fit.observe(batch, secs)
        if model is not None:
            break
    assert model is not None, fit.missing()
    assert ReadinessRule().min_steps <= used < len(steps)
    assert fit.ready() and fit.num_fits == 1
    tol = 0.02 if noise == 0 else 0.15
    for c in (64, 128, 256, 512):
        for h in (0, 1024, 4096, 7680):
            assert model.predict_time(c, h) == pytest.approx(TRUE.predict_time(c, h), rel=tol), \
                (c, h)
    assert model.fit_info["form"] == "full"


def test_a_rejected_fit_keeps_collecting_and_retries_later(caplog):
    """Timings that do not grow with chunk x history (no quadratic term) are a FitError:
    no model, a debug line, and the next try only `retry_every` steps later."""
    import logging

    fit = LiveFit(retry_every=8)
    flat = [(b, 0.01) for b, _ in static_steps(PROMPTS)]
    with caplog.at_level(logging.DEBUG, logger="vllm.dcpp"):
        for batch, secs in flat[:40]:
            assert fit.observe(batch, secs) is None
    assert fit.ready() and fit.last_error and "degenerate" in fit.last_error
    tries = fit.num_fits
    assert 1 <= tries <= 2  # ready at 32-ish steps, then again 8 steps later
    assert "fit on" in caplog.text and "rejected" in caplog.text
    for batch, secs in static_steps(PROMPTS)[40:]:  # the engine's real timings from now on
        fit.observe(batch, secs)
    assert fit.num_fits > tries


def test_window_and_profile_samples():
    fit = LiveFit(window=40)
    steps = static_steps(PROMPTS) + [([(100, 0), (300, 700)], 0.02)]
    for batch, secs in steps:
        fit.add(batch, secs)
    assert len(fit.samples) == 40 and fit.num_steps == len(steps)
    points = fit.profile_samples()
    assert len(points) == 39  # the two-request step is not a profile point
    assert all(len(p) == 3 for p in points)
    fit.add([(10, 0)], 0.0)  # a step without a time is not a sample
    assert fit.num_steps == len(steps)
