"""Planning cost for every model form the fit returns (issue 20, item 3): counted, not timed.

`default_plan` used to add a coarse DP (`optimal_plan`, 15-35 ms) whenever the work depends on
the chunking (beta != 2*alpha or delta > 0: every fit seen so far). It now searches the fitted
family (`TightFit`) instead. These tests count what a plan costs (tight passes, rule passes,
front-table steps, no DP) for the three forms at 3k, 16k, 128k and 1M tokens and P = 2, 4, 8,
and compare the plans with the previous planner (`dp_default_plan`) on a grid.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpp.chunker import planner
from dcpp.chunker import rule as rule_mod
from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planner import (PlanSpec, default_plan, dp_default_plan, equal_time_plan,
                                  fit_applies, plan_cost)
from dcpp.chunker.rule import TightFit

# The demo's cached profile (form "full", per stage), its least-squares fit in the "ascend" form
# (beta = alpha, delta = gamma; chunks 256-4096 x histories 0-16k, as in
# benchmarks/scheduler_overhead.py) and the synthetic executor's stage (form "causal":
# beta = 2*alpha, delta = 0).
FULL = HistoryLatencyModel(2.37e-8, 3.02e-8, 1.94e-5, 4.9e-7, 3.5e-3)
ASCEND = HistoryLatencyModel(3.0062e-8, 3.0062e-8, 7.0226e-7, 7.0226e-7, 7.9725e-3)
CAUSAL = HistoryLatencyModel(2e-9, 4e-9, 2e-6, 0.0, 2e-3)
FORMS = {"full": FULL, "ascend": ASCEND, "causal": CAUSAL}

LENGTHS = (3072, 16384, 131072, (1 << 20) - 1)
STAGES = (2, 4, 8)


def _spec(p: int, budget: int = 2048, min_chunk: int = 256) -> PlanSpec:
    return PlanSpec(max_num_batched_tokens=budget, max_model_len=1 << 20, num_stages=p,
                    min_chunk=min_chunk)


class _Counts:
    """Tight passes, rule passes and front-table (+ polish) steps of the plans made while
    installed; any call of the DP fails the test."""

    def __init__(self, monkeypatch):
        self.tight = self.rule = self.steps = 0
        run, sweep = TightFit.run, rule_mod.Rule.sweep
        counts = self

        def counted_run(fit, *args, **kwargs):
            before = fit.table_steps
            out = run(fit, *args, **kwargs)
            if not kwargs.get("keep"):  # `TightFit.plan` re-runs the chosen pass
                counts.tight += 1
            counts.steps += fit.table_steps - before
            return out

        def counted_sweep(self_, *args, **kwargs):
            counts.rule += 1
            return sweep(self_, *args, **kwargs)

        def no_dp(*args, **kwargs):
            raise AssertionError("default_plan ran the DP")

        monkeypatch.setattr(TightFit, "run", counted_run)
        monkeypatch.setattr(rule_mod.Rule, "sweep", counted_sweep)
        monkeypatch.setattr(planner, "optimal_plan", no_dp)
        polish = TightFit.polish

        def counted_polish(fit, plan, *args):
            before = fit.table_steps
            out = polish(fit, plan, *args)
            counts.steps += fit.table_steps - before
            return out

        monkeypatch.setattr(TightFit, "polish", counted_polish)

    def reset(self):
        self.tight = self.rule = self.steps = 0


@pytest.mark.parametrize("form", ["full", "ascend"])
def test_fitted_forms_plan_with_few_passes_and_no_dp(monkeypatch, form):
    # What makes planning these forms fast: a bounded number of tight passes (each about as
    # costly as one rule pass: a step per run of equal chunks), one rule pass (the equal-time
    # plan), a few hundred front-table steps, and no DP (which took 15-35 ms).
    model = FORMS[form]
    counts = _Counts(monkeypatch)
    for n, p in itertools.product(LENGTHS, STAGES):
        spec = _spec(p)
        assert fit_applies(model, n, spec) == "fit"
        counts.reset()
        plan = default_plan(model, n, spec)
        assert sum(plan) == n
        # Few chunks (3k): a scan of cheap passes; 16k: Brent's method + a local scan;
        # long prompts: 4 Brent passes.
        most = {3072: 36, 16384: 16, 131072: 6, (1 << 20) - 1: 6}[n]
        assert counts.tight <= most, (form, n, p, counts.tight)
        assert counts.rule == 1, (form, n, p, counts.rule)  # the equal-time plan
        assert counts.steps <= 1200, (form, n, p, counts.steps)


def test_causal_form_keeps_the_pipeline_search(monkeypatch):
    # The telescoping form plans as before (the same plans, `test_planner`): the pipeline
    # search's rule passes, no tight passes, no DP.
    counts = _Counts(monkeypatch)
    for n, p in itertools.product(LENGTHS, STAGES):
        spec = _spec(p)
        assert fit_applies(CAUSAL, n, spec) == "rule"
        counts.reset()
        default_plan(CAUSAL, n, spec)
        assert counts.tight == 0 and counts.rule <= 30, (n, p, counts.rule)


def test_telescoping_plans_are_the_previous_planners():
    for n, p in itertools.product((3072, 16384, 30_000, 131072), STAGES):
        spec = _spec(p)
        assert default_plan(CAUSAL, n, spec) == dp_default_plan(CAUSAL, n, spec)


def _ratios(models, lengths, stages, specs):
    out = []
    for model, n, p, (budget, min_chunk) in itertools.product(models, lengths, stages, specs):
        if n <= budget:
            continue
        spec = _spec(p, budget, min_chunk)
        new = plan_cost(model, default_plan(model, n, spec), p)
        out.append(new / plan_cost(model, dp_default_plan(model, n, spec), p))
    return np.array(out)


def test_fitted_plans_against_the_previous_planner_on_a_grid():
    # The previous planner's coarse DP is exact on the 64-token grid up to 16k tokens (within
    # its own 1e-3 branch-and-bound tolerance) and coarser beyond: the fitted plans match it
    # within that tolerance on short prompts and beat it on long ones.
    r = _ratios([FULL, ASCEND], (3072, 8192, 12288, 16384, 32768, 131072, (1 << 20) - 1),
                STAGES, ((2048, 256), (4096, 256)))
    assert np.median(r) <= 1.0
    assert r.max() <= 1.0015, r.max()
    long_r = _ratios([FULL, ASCEND], (131072, (1 << 20) - 1), STAGES, ((2048, 256),))
    assert long_r.max() < 0.9998, long_r  # 0.03-1% better: 64-token chunks, not a coarse grid


def test_fitted_plans_with_the_default_floor():
    # min_chunk 4096 (the config's default) beside budgets of 8k-32k: floor and cap close.
    r = _ratios([FULL, ASCEND], (12288, 32768, 131072, (1 << 20) - 1), STAGES,
                ((8192, 4096), (16384, 4096), (32768, 4096)))
    assert np.median(r) <= 1.0 and r.max() <= 1.002, r.max()


models = st.builds(
    HistoryLatencyModel,
    alpha=st.floats(1e-11, 1e-8), beta=st.floats(0, 3e-8), gamma=st.floats(1e-7, 3e-5),
    delta=st.floats(1e-9, 2e-5), c=st.floats(1e-4, 0.02),
)


@settings(max_examples=60, deadline=None)
@given(model=models, p=st.integers(2, 8), budget_units=st.integers(4, 64),
       floor_units=st.integers(1, 32), n=st.integers(1, 300_000),
       h0=st.sampled_from([0, 4096, 100_000]), page=st.sampled_from([16, 64, 128]))
def test_tight_fit_plans_are_valid_and_priced_exactly(model, p, budget_units, floor_units, n,
                                                      h0, page):
    # Every candidate the passes price is a plan within the limits, priced in closed form
    # (runs of equal chunks in one step) as `plan_cost` prices it chunk by chunk.
    align = max(page, 64)
    spec = PlanSpec(max_num_batched_tokens=align * budget_units, max_model_len=10**7,
                    num_stages=p, min_chunk=align * min(floor_units, budget_units),
                    page_size=page)
    fit = TightFit(model, spec, n, h0)
    top = float(model.predict_time(spec.max_num_batched_tokens, h0 + n))
    for m in np.geomspace(float(model.predict_time(spec.floor, h0)), top, 7):
        for table in (False, True):
            f, key, _ = fit.run(float(m), table=table)
            if key is None:
                continue
            plan = fit.plan(float(m), key)
            assert sum(plan) == n and 1 <= plan[-1] <= spec.max_num_batched_tokens
            for c in plan[:-1]:
                assert c % spec.align == 0 and spec.floor <= c <= spec.cap, (c, spec, plan)
            cost = plan_cost(model, plan, p, h0)
            if not 0 < key[2] < 10**6:  # (a ramp front is priced before its rounding)
                assert f == pytest.approx(cost, rel=1e-9)
            assert fit.cost(plan) == pytest.approx(cost, rel=1e-12)


def _brute_band(model, plan, p, h0, spec):
    """The best plan with plan's chunk count, boundaries within one unit of plan's."""
    bnd = np.cumsum([h0] + plan)
    best = (math.inf, None)
    for offs in itertools.product((-1, 0, 1), repeat=len(plan) - 1):
        pos = [h0] + [int(b + o * spec.align) for b, o in zip(bnd[1:-1], offs)] + [int(bnd[-1])]
        cand = [b - a for a, b in zip(pos, pos[1:])]
        if any(not spec.floor <= c <= spec.cap for c in cand[:-1]):
            continue
        if not 1 <= cand[-1] <= spec.max_num_batched_tokens:
            continue
        best = min(best, (plan_cost(model, cand, p, h0), cand), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("model", [FULL, ASCEND], ids=["full", "ascend"])
@pytest.mark.parametrize("n,p,h0", [(3072, 8, 0), (4000, 2, 0), (4500, 4, 4096)])
def test_polish_is_the_best_plan_in_its_band(model, n, p, h0):
    spec = _spec(p, min_chunk=512)
    start = equal_time_plan(model, n, spec, h0)
    assert len(start) <= 9  # 3^8 plans to compare with
    fit = TightFit(model, spec, n, h0)
    got = fit.polish(start)
    want, _ = _brute_band(model, start, p, h0, spec)
    assert plan_cost(model, got, p, h0) == pytest.approx(want, rel=1e-12)
    assert plan_cost(model, got, p, h0) <= plan_cost(model, start, p, h0)
