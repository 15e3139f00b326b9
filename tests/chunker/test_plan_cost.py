"""Planning cost for every model form the fit returns (issue 20, item 3): counted, not timed.

`default_plan` used to add a coarse DP (`optimal_plan`, 15-35 ms) whenever the work depends on
the chunking (beta != 2*alpha or delta > 0: every fit seen so far). It now searches the cap on
the step time of the free-then-tight plan (`ramp.RampPlan`, `ramp_search.ramp_plan`). These
tests count what a plan costs (prices, the closed-form steps they walk, rule passes, no DP)
for the three forms at 3k-1M tokens and P = 2, 4, 8, check that every priced plan is valid
and priced exactly, and compare the plans with the previous planner (`dp_default_plan`).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpp.chunker import planner
from dcpp.chunker import rule as rule_mod
from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planner import (PlanSpec, default_plan, dp_default_plan, plan_cost,
                                  ramp_applies, static_plan)
from dcpp.chunker.ramp import RampPlan
from dcpp.chunker.ramp_search import MAX_PRICES

# The demo's cached profile (form "full", per stage), its least-squares fit in the "ascend" form
# (beta = alpha, delta = gamma; chunks 256-4096 x histories 0-16k, as in
# benchmarks/scheduler_overhead.py) and the synthetic executor's stage (form "causal":
# beta = 2*alpha, delta = 0).
FULL = HistoryLatencyModel(2.37e-8, 3.02e-8, 1.94e-5, 4.9e-7, 3.5e-3)
ASCEND = HistoryLatencyModel(3.0062e-8, 3.0062e-8, 7.0226e-7, 7.0226e-7, 7.9725e-3)
CAUSAL = HistoryLatencyModel(2e-9, 4e-9, 2e-6, 0.0, 2e-3)

LENGTHS = (3072, 16384, 131072, (1 << 20) - 1)
STAGES = (2, 4, 8)


def _spec(p: int, budget: int = 2048, min_chunk: int = 256) -> PlanSpec:
    return PlanSpec(max_num_batched_tokens=budget, max_model_len=1 << 20, num_stages=p,
                    min_chunk=min_chunk)


class _Counts:
    """Prices, their steps and rule passes of the plans made while installed; any call of
    the DP fails the test."""

    def __init__(self, monkeypatch):
        self.prices = self.steps = self.rule = 0
        price, sweep = RampPlan.price, rule_mod.Rule.sweep
        counts = self

        def counted_price(rp, m):
            before = rp.steps
            out = price(rp, m)
            counts.prices += 1
            counts.steps += rp.steps - before
            return out

        def counted_sweep(self_, *args, **kwargs):
            counts.rule += 1
            return sweep(self_, *args, **kwargs)

        def no_dp(*args, **kwargs):
            raise AssertionError("default_plan ran the DP")

        monkeypatch.setattr(RampPlan, "price", counted_price)
        monkeypatch.setattr(rule_mod.Rule, "sweep", counted_sweep)
        monkeypatch.setattr(planner, "optimal_plan", no_dp)

    def reset(self):
        self.prices = self.steps = self.rule = 0


@pytest.mark.parametrize("model", [FULL, ASCEND], ids=["full", "ascend"])
def test_fitted_forms_plan_with_few_prices_and_no_dp(monkeypatch, model):
    # What makes planning these forms fast: at most MAX_PRICES prices, each a few dozen
    # closed-form steps whatever the length (runs of equal chunks), one rule pass (the
    # equal-time plan), no DP (which took 15-35 ms).
    counts = _Counts(monkeypatch)
    for n, p in itertools.product(LENGTHS, STAGES):
        spec = _spec(p)
        assert ramp_applies(model, n, spec) == "ramp"
        counts.reset()
        plan = default_plan(model, n, spec)
        assert sum(plan) == n
        assert counts.prices <= MAX_PRICES, (n, p, counts.prices)
        assert counts.steps <= 60 * counts.prices, (n, p, counts.steps)
        assert counts.rule == 1, (n, p, counts.rule)


def test_causal_form_keeps_the_pipeline_search(monkeypatch):
    # The telescoping form plans as before: the pipeline search's rule passes, no prices, no
    # DP, and the same plans as the previous planner.
    counts = _Counts(monkeypatch)
    for n, p in itertools.product(LENGTHS, STAGES):
        spec = _spec(p)
        assert ramp_applies(CAUSAL, n, spec) == "rule"
        counts.reset()
        default_plan(CAUSAL, n, spec)
        assert counts.prices == 0 and counts.rule <= 30, (n, p, counts.rule)


def test_telescoping_plans_are_the_previous_planners():
    for n, p in itertools.product((3072, 16384, 30_000, 131072), STAGES):
        spec = _spec(p)
        assert default_plan(CAUSAL, n, spec) == dp_default_plan(CAUSAL, n, spec)


def _ratios(models, lengths, stages, limits, history=0):
    out = []
    for model, n, p, (budget, min_chunk) in itertools.product(models, lengths, stages, limits):
        if n <= budget:
            continue
        spec = _spec(p, budget, min_chunk)
        new = plan_cost(model, default_plan(model, n, spec, history), p, history)
        out.append(new / plan_cost(model, dp_default_plan(model, n, spec, history), p, history))
    return np.array(out)


def test_fitted_plans_against_the_previous_planner_on_a_grid():
    # The previous planner's coarse DP is exact on the 64-token grid up to 16k tokens (within
    # its 1e-3 branch-and-bound tolerance) and coarser beyond: the ramp plans are within 0.5%
    # of it on short prompts and beat it on long ones.
    r = _ratios([FULL, ASCEND], (3072, 8192, 16384, 32768, 131072), STAGES,
                ((2048, 256), (4096, 256)))
    assert np.median(r) <= 1.0
    assert r.max() <= 1.005, r.max()
    long_r = _ratios([FULL, ASCEND], (131072,), STAGES, ((2048, 256),))
    assert long_r.max() < 0.999, long_r


def test_fitted_plans_with_a_history():
    r = _ratios([FULL, ASCEND], (12288, 32768, 131072), STAGES, ((2048, 256), (4096, 512)),
                history=4096)
    assert np.median(r) <= 1.0 and r.max() <= 1.005, r.max()


def test_floors_above_the_free_size_keep_the_dp():
    # min_chunk 4096 (the config's default) is above these models' free sizes (~0.6-3k
    # tokens): every free chunk would sit at the floor, so the previous planner runs.
    for model, n, p in itertools.product([FULL, ASCEND], (12288, 131072), STAGES):
        spec = _spec(p, 8192, 4096)
        assert ramp_applies(model, n, spec, 4096) == "dp"
        assert default_plan(model, n, spec, 4096) == dp_default_plan(model, n, spec, 4096)


models = st.builds(
    HistoryLatencyModel,
    alpha=st.floats(1e-11, 1e-8), beta=st.floats(0, 3e-8), gamma=st.floats(1e-7, 3e-5),
    delta=st.floats(1e-9, 2e-5), c=st.floats(1e-4, 0.02),
)


@settings(max_examples=60, deadline=None)
@given(model=models, p=st.integers(2, 8), budget_units=st.integers(4, 64),
       floor_units=st.integers(1, 32), n=st.integers(1, 300_000),
       h0=st.sampled_from([0, 4096, 100_000]), page=st.sampled_from([16, 64, 128]))
def test_ramp_plans_are_valid_and_priced_exactly(model, p, budget_units, floor_units, n, h0,
                                                 page):
    # Every plan a price builds (kappa of either sign, floors up to the cap) is within the
    # limits and priced in closed form as `plan_cost` prices it chunk by chunk.
    align = max(page, 64)
    spec = PlanSpec(max_num_batched_tokens=align * budget_units, max_model_len=10**7,
                    num_stages=p, min_chunk=align * min(floor_units, budget_units),
                    page_size=page)
    rp = RampPlan(model, spec, n, h0)
    top = float(model.predict_time(min(n, spec.max_num_batched_tokens), h0 + n))
    for m in np.geomspace(0.5 * float(model.predict_time(1, h0)), top, 9):
        f, key = rp.price(float(m))
        if key is None:
            continue
        plan = rp.plan(key)
        assert sum(plan) == n and 1 <= plan[-1] <= spec.max_num_batched_tokens
        for c in plan[:-1]:
            assert c % spec.align == 0 and spec.floor <= c <= spec.cap, (c, spec, plan)
        cost = plan_cost(model, plan, p, h0)
        assert f == pytest.approx(cost, rel=1e-9)
    assert sum(default_plan(model, n, spec, h0)) == n


@pytest.mark.parametrize("alpha, gamma, delta, n, h0", [
    (3.043906775022785e-10, 7.265993466243896e-06, 0.0, 145, 28),
    (3.043906775022785e-10, 7.265993466243896e-06, 2.2250738585e-313, 145, 28),
    (1e-9, 1e-7, 0.0, 65, 2978),  # the case CI's hypothesis run found
])
def test_ramp_plans_without_history_terms(alpha, gamma, delta, n, h0):
    """beta = 0 (no step grows with history) with delta 0 or subnormal: no chunk's latest
    end is finite and free_below overflows; the plan still covers the prompt (found by
    hypothesis in test_planner)."""
    model = HistoryLatencyModel(alpha=alpha, beta=0.0, gamma=gamma, delta=delta,
                                c=0.00390625)
    spec = PlanSpec(max_num_batched_tokens=128, max_model_len=10_000_000, num_stages=2,
                    min_chunk=1, page_size=1, smooth_factor=1.0)
    plan = default_plan(model, n, spec, h0)
    assert sum(plan) == n and all(0 < c <= 128 for c in plan)


@pytest.mark.parametrize("beta, delta, n, h0", [
    (0.0, 1.4657272602194047e-05, 2, 2978),  # only prefix work: every step's target is 0
    (1.664683188479104e-07, 0.0, 2, 0),  # a whole prompt at history 0 costs 0 s
])
def test_models_without_a_step_cost_plan_static(beta, delta, n, h0):
    """alpha = gamma = c = 0: a step at history 0 takes no time, so there is nothing to
    balance; the plan is the static one (found by fuzzing default_plan)."""
    model = HistoryLatencyModel(alpha=0.0, beta=beta, gamma=0.0, delta=delta, c=0.0)
    spec = PlanSpec(max_num_batched_tokens=128, max_model_len=10_000_000, num_stages=1,
                    min_chunk=1, page_size=1, smooth_factor=1.0)
    assert default_plan(model, n, spec, h0) == static_plan(n, spec, h0)
