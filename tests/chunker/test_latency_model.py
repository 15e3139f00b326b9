"""Latency model fits: recovery of known coefficients, robustness, degenerate-fit rejection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpp.chunker.latency_model import FitError, HistoryLatencyModel, QuadraticModel
from dcpp.chunker.profiler import sampling_design

DESIGN = sampling_design(24, max_num_batched_tokens=16384, max_model_len=131072)


def _samples(model, points, noise, rng):
    return [([(c, h)], float(model.predict_time(c, h)) * (1 + noise * rng.standard_normal()))
            for c, h in points]


@settings(max_examples=25, deadline=None)
@given(
    # Shares of the time of a 16k chunk at history 64k taken by each term (the rest: c).
    quad=st.floats(0.05, 0.4), cross=st.floats(0.1, 0.5), lin=st.floats(0.1, 0.5),
    hist=st.floats(0.0, 0.2), seed=st.integers(0, 2**31 - 1),
)
def test_full_fit_recovers_known_coefficients(quad, cross, lin, hist, seed):
    c_ref, h_ref, t_ref = 16384, 65536, 1.0
    fixed = max(0.02, 1 - quad - cross - lin - hist)
    truth = HistoryLatencyModel(alpha=quad * t_ref / c_ref**2, beta=cross * t_ref / (c_ref * h_ref),
                                gamma=lin * t_ref / c_ref, delta=hist * t_ref / h_ref, c=fixed)
    rng = np.random.default_rng(seed)
    fit = HistoryLatencyModel.fit(_samples(truth, DESIGN, 0.005, rng))
    # Coefficients that carry a real share of the time come back within a few percent.
    for name, share in (("alpha", quad), ("beta", cross), ("gamma", lin), ("c", fixed)):
        if share >= 0.2:
            assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.2), name
    # Predictions everywhere in the profiled region (chunks budget/8..budget) within 2 %.
    test = [(int(c), int(h)) for c, h in zip(rng.integers(2048, 16385, 50),
                                              rng.integers(0, 131072 - 16384, 50))]
    err = [abs(fit.predict_time(c, h) / truth.predict_time(c, h) - 1) for c, h in test]
    assert max(err) < 0.02


def test_ascend_and_causal_forms_recover_their_coefficients():
    rng = np.random.default_rng(1)
    a, b, c = 2e-10, 3e-6, 0.002
    ascend_truth = HistoryLatencyModel(alpha=a, beta=a, gamma=b, delta=b, c=c)
    fit = HistoryLatencyModel.fit(_samples(ascend_truth, DESIGN, 0.002, rng), form="ascend")
    assert (fit.alpha, fit.beta) == (pytest.approx(a, rel=0.03), pytest.approx(a, rel=0.03))
    assert fit.gamma == fit.delta == pytest.approx(b, rel=0.05)
    causal_truth = HistoryLatencyModel.from_cost(a, b, c)
    fit = HistoryLatencyModel.fit(_samples(causal_truth, DESIGN, 0.002, rng), form="causal")
    assert fit.beta == pytest.approx(2 * fit.alpha) and fit.delta == 0
    assert fit.alpha == pytest.approx(a, rel=0.03) and fit.c == pytest.approx(c, rel=0.1)


def test_quadratic_fit_recovers_abc():
    rng = np.random.default_rng(2)
    truth = QuadraticModel(1e-9, 4e-5, 0.01)
    lengths = np.linspace(512, 32768, 16).astype(int)
    secs = truth.predict(lengths) * (1 + 0.003 * rng.standard_normal(16))
    fit = QuadraticModel.fit(lengths, secs)
    assert fit.a == pytest.approx(1e-9, rel=0.05) and fit.b == pytest.approx(4e-5, rel=0.1)
    h = fit.to_history_model()  # f(H+C) - f(H) + c
    assert h.predict_time(1000, 5000) == pytest.approx(
        fit.predict(6000) - fit.predict(5000) + fit.c)


def test_outliers_are_trimmed():
    rng = np.random.default_rng(3)
    truth = HistoryLatencyModel(2e-10, 3e-10, 5e-6, 1e-7, 0.003)
    samples = _samples(truth, DESIGN, 0.005, rng)
    for i in (3, 11):  # two passes hit by a 4x stall
        batch, secs = samples[i]
        samples[i] = (batch, secs * 4)
    fit = HistoryLatencyModel.fit(samples)
    assert fit.fit_info["outliers"] >= 2
    for c, h in DESIGN:
        assert fit.predict_time(c, h) == pytest.approx(truth.predict_time(c, h), rel=0.03)


def test_degenerate_fits_are_rejected_with_reason():
    flat = [([(c, h)], 0.01 + 1e-7 * c) for c, h in DESIGN]  # linear: no quadratic term
    with pytest.raises(FitError, match="a <= 0"):
        HistoryLatencyModel.fit(flat)
    with pytest.raises(FitError, match="too few points: got 3"):
        HistoryLatencyModel.fit(flat[:3])
    with pytest.raises(FitError, match="timing #2 is nan"):
        HistoryLatencyModel.fit([(b, s if i != 2 else math.nan) for i, (b, s) in enumerate(flat)])
    with pytest.raises(FitError, match="rank-deficient"):
        HistoryLatencyModel.fit([([(4096, 0)], 0.1 + 1e-3 * i) for i in range(10)])
    rng = np.random.default_rng(4)
    truth = HistoryLatencyModel(2e-10, 3e-10, 5e-6, 1e-7, 0.003)
    noise = [([(c, h)], float(truth.predict_time(c, h) * rng.uniform(0.3, 3.0)))
             for c, h in DESIGN]
    with pytest.raises(FitError, match="poor"):
        HistoryLatencyModel.fit(noise)
    with pytest.raises(FitError, match="a <= 0"):
        QuadraticModel.fit([100, 200, 300, 400], [0.3, 0.2, 0.1, 0.05])
    with pytest.raises(FitError, match="distinct lengths"):
        QuadraticModel.fit([100, 100, 200], [0.1, 0.1, 0.2])
    assert issubclass(FitError, ValueError)


def test_predict_batch_sums_requests_and_counts_c_once():
    m = HistoryLatencyModel(1e-9, 2e-9, 1e-6, 1e-7, 0.005)
    batch = [(100, 0), (1, 5000), (300, 200)]
    expect = sum(m.predict_time(c, h) - m.c for c, h in batch) + m.c
    assert m.predict_batch(batch) == pytest.approx(expect)
    with pytest.raises(ValueError):
        m.predict_batch([])
    with pytest.raises(ValueError):
        m.predict_batch([(0, 10)])


@settings(max_examples=30, deadline=None)
@given(target=st.floats(0.01, 5.0), history=st.integers(0, 10**6))
def test_solve_chunk_inverts_predict_time(target, history):
    m = HistoryLatencyModel(1.3e-10, 2.6e-10, 7e-6, 1e-8, 0.003)
    c = m.solve_chunk(target, history)
    if c > 0:
        assert m.predict_time(c, history) == pytest.approx(target, rel=1e-9)
    else:
        assert m.predict_time(0, history) >= target


def test_dict_roundtrip_and_validation():
    m = HistoryLatencyModel(1e-9, 2e-9, 1e-6, 1e-7, 0.005, fit_info={"form": "full"})
    assert HistoryLatencyModel.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="lacks keys"):
        HistoryLatencyModel.from_dict({"alpha": 1})
    with pytest.raises(ValueError, match="finite and >= 0"):
        HistoryLatencyModel(-1e-9, 0, 0, 0, 0)
    assert HistoryLatencyModel.from_cost(1e-9, 1e-6, 0.01).is_telescoping
