"""Plans: invariants (hypothesis), smoothing, tails, DP optimality by brute force, bounds."""

from __future__ import annotations

import itertools

import numpy as np

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import LLAMA8B_P4, PREFIX_HEAVY
from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planner import (PlanSpec, default_plan, equal_time_plan, lower_bound,
                                  optimal_plan, pipeline_plan, plan_cost, rule_chunk,
                                  rule_plan, static_plan)

models = st.builds(
    HistoryLatencyModel,
    alpha=st.floats(1e-11, 1e-9), beta=st.floats(0, 2e-9), gamma=st.floats(1e-7, 2e-5),
    delta=st.floats(0, 1e-6), c=st.floats(0, 0.01),
)


@st.composite
def specs(draw):
    page = draw(st.sampled_from([1, 16, 64, 128, 96]))
    align = max(page, 64)
    budget = align * draw(st.integers(2, 128))
    return PlanSpec(max_num_batched_tokens=budget, max_model_len=10**7,
                    num_stages=draw(st.integers(2, 8)),
                    min_chunk=draw(st.integers(1, budget)), page_size=page,
                    smooth_factor=draw(st.sampled_from([1.0, 0.5, 0.25, 1.0])))


def _check_invariants(plan, n, spec):
    assert sum(plan) == n and all(c >= 1 for c in plan)
    assert all(c <= spec.max_num_batched_tokens for c in plan)
    for c in plan[:-1]:
        assert c % spec.align == 0 and c >= min(spec.min_chunk, spec.cap), (c, spec)


@settings(max_examples=40, deadline=None)
@given(model=models, spec=specs(), n=st.integers(1, 300_000), h0=st.integers(0, 50_000))
def test_plans_cover_the_prompt_aligned_and_floored(model, spec, n, h0):
    for plan in (equal_time_plan(model, n, spec, h0), default_plan(model, n, spec, h0)):
        _check_invariants(plan, n, spec)
    # dcpp's default is never worse than equal-time under the model.
    assert plan_cost(model, default_plan(model, n, spec, h0), spec.num_stages, h0) <= (
        plan_cost(model, equal_time_plan(model, n, spec, h0), spec.num_stages, h0) * (1 + 1e-12))


@settings(max_examples=40, deadline=None)
@given(model=models, spec=specs(), h1=st.integers(0, 10**6), dh=st.integers(0, 10**6))
def test_chunk_non_increasing_with_history_for_sigma_one(model, spec, h1, dh):
    spec = PlanSpec(**{**spec.__dict__, "smooth_factor": 1.0})
    target = float(model.predict_time(spec.max_num_batched_tokens, 0))
    rem = 10**7  # no tail merge
    c1 = rule_chunk(model, h1, rem - h1 - dh, target, PlanSpec(**{**spec.__dict__, "max_model_len": 10**8}))
    c2 = rule_chunk(model, h1 + dh, rem - h1 - dh, target, PlanSpec(**{**spec.__dict__, "max_model_len": 10**8}))
    assert c2 <= c1


@settings(max_examples=30, deadline=None)
@given(model=models, spec=specs(), n=st.integers(1, 200_000), h0=st.integers(0, 10_000))
def test_smooth_factor_zero_reproduces_static(model, spec, n, h0):
    spec0 = PlanSpec(**{**spec.__dict__, "smooth_factor": 0.0})
    static = static_plan(n, spec0, h0)
    b = spec.max_num_batched_tokens
    assert static == [b] * (n // b) + ([n % b] if n % b else [])
    assert equal_time_plan(model, n, spec0, h0) == static
    assert pipeline_plan(model, n, spec0, h0) == static
    assert default_plan(model, n, spec0, h0) == static


def _history_where_rule_gives(model, spec, chunk):
    target = float(model.predict_time(spec.max_num_batched_tokens, 0))
    for h in range(0, 10**6, 64):
        if rule_chunk(model, h, 10**6, target, spec) == chunk:
            return h
    raise AssertionError("no such history")


def test_tiny_tail_is_merged_when_it_costs_a_step():
    # SGLang issue 23621: a 192-token tail after equal-time chunks cost a whole extra step.
    # With a per-step cost c comparable to the tail's work, one merged chunk is cheaper.
    model = HistoryLatencyModel(alpha=1e-10, beta=2e-10, gamma=1e-5, delta=0, c=0.02)
    spec = PlanSpec(max_num_batched_tokens=8192, max_model_len=10**6, num_stages=2,
                    min_chunk=1024)
    h = _history_where_rule_gives(model, spec, 4096)
    assert equal_time_plan(model, 4096 + 192, spec, history=h) == [4288]
    # Same target, but a budget of 4096 does not allow the merge: the tail stays.
    target = float(model.predict_time(8192, 0))
    spec_small = PlanSpec(**{**spec.__dict__, "max_num_batched_tokens": 4096})
    assert rule_chunk(model, h, 4096 + 192, target, spec_small) == 4096


def test_tail_kept_when_merging_would_stretch_the_pipeline():
    # No fixed cost and 8 stages: a merged chunk raises max(s) for all 7 hand-offs, while a
    # separate tail adds only its own small time. The rule compares both.
    model = HistoryLatencyModel(alpha=1e-10, beta=2e-10, gamma=1e-5, delta=0, c=0.0)
    spec = PlanSpec(max_num_batched_tokens=8192, max_model_len=10**6, num_stages=8,
                    min_chunk=1024)
    h = _history_where_rule_gives(model, spec, 4096)
    assert equal_time_plan(model, 4096 + 192, spec, history=h) == [4096, 192]


def _brute_force(model, n, spec, grid, h0=0):
    best = float("inf")
    units = n // grid
    for k in range(1, units + 1):
        for cuts in itertools.combinations(range(1, units), k - 1):
            bounds = [0, *[c * grid for c in cuts], n]
            plan = [b - a for a, b in zip(bounds, bounds[1:])]
            if any(not (spec.floor <= c <= spec.cap) for c in plan[:-1]):
                continue
            if plan[-1] > spec.max_num_batched_tokens:
                continue
            best = min(best, plan_cost(model, plan, spec.num_stages, h0))
    return best


@settings(max_examples=12, deadline=None)
@given(model=models, p=st.integers(2, 8), units=st.integers(3, 13), budget_units=st.integers(1, 8),
       floor_units=st.integers(1, 3), h0=st.sampled_from([0, 4096]))
def test_dp_no_worse_than_brute_force(model, p, units, budget_units, floor_units, h0):
    g = 512
    n = units * g
    spec = PlanSpec(max_num_batched_tokens=budget_units * g, max_model_len=10**6, num_stages=p,
                    min_chunk=min(floor_units, budget_units) * g)
    brute = _brute_force(model, n, spec, g, h0)
    opt = optimal_plan(model, n, spec, h0, grid=g, rel_tol=1e-9)
    _check_invariants(opt, n, spec)
    assert plan_cost(model, opt, p, h0) == pytest.approx(brute, rel=1e-9)
    assert lower_bound(model, n, spec, h0) <= brute * (1 + 1e-9)


@pytest.mark.parametrize("model", [LLAMA8B_P4, PREFIX_HEAVY], ids=["llama8b", "prefix"])
@pytest.mark.parametrize("n,p", [(65536, 4), (131072, 8), (262144, 2)])
def test_default_close_to_dp_and_above_bound(model, n, p):
    spec = PlanSpec(max_num_batched_tokens=32768, max_model_len=n, num_stages=p, min_chunk=4096)
    opt = plan_cost(model, optimal_plan(model, n, spec), p)
    dflt = plan_cost(model, default_plan(model, n, spec), p)
    eq = plan_cost(model, equal_time_plan(model, n, spec), p)
    static = plan_cost(model, static_plan(n, spec), p)
    assert lower_bound(model, n, spec) <= opt * (1 + 1e-9)
    assert dflt <= 1.02 * opt and dflt <= eq <= static * 1.0001


def test_bad_plan_inputs():
    spec = PlanSpec(max_num_batched_tokens=4096, max_model_len=10000)
    with pytest.raises(ValueError, match="exceeds max_model_len=10000"):
        static_plan(9000, spec, history=2000)
    with pytest.raises(ValueError, match="prompt_len=0"):
        equal_time_plan(LLAMA8B_P4, 0, spec)
    with pytest.raises(ValueError, match="smooth_factor"):
        PlanSpec(max_num_batched_tokens=4096, max_model_len=1, smooth_factor=2)
    with pytest.raises(ValueError, match="num_stages=0"):
        PlanSpec(max_num_batched_tokens=4096, max_model_len=1, num_stages=0)


def _rule_by_chunk(model, n, spec, target, h0):
    expect, h, rem = [], h0, n
    while rem > 0:
        c = rule_chunk(model, h, rem, target, spec)
        expect.append(c)
        h, rem = h + c, rem - c
    return expect


linear_models = st.builds(  # alpha = 0: chunk time linear in the chunk (live fits on CPU)
    HistoryLatencyModel, alpha=st.just(0.0), beta=st.floats(0, 2e-9),
    gamma=st.floats(1e-7, 2e-5), delta=st.floats(0, 1e-6), c=st.floats(0, 0.01))


@settings(max_examples=80, deadline=None)
@example(model=HistoryLatencyModel(alpha=9.7e-10, beta=5e-324, gamma=4.2e-6, delta=0.0, c=0.0),
         spec=PlanSpec(max_num_batched_tokens=128, max_model_len=10**7, num_stages=2,
                       min_chunk=1, page_size=1),
         n=641, h0=0, target_scale=2.0, room=0)  # a denormal beta: a run's end at infinity
@given(model=st.one_of(models, linear_models), spec=specs(), n=st.integers(1, 400_000),
       h0=st.integers(0, 50_000), target_scale=st.floats(0.05, 20.0), room=st.integers(0, 5000))
def test_rule_pass_equals_the_rule_chunk_by_chunk(model, spec, n, h0, target_scale, room):
    # The planners' pass (`Rule.sweep`, which takes runs of equal chunks in one step)
    # against `rule_chunk` called per chunk, with max_model_len sometimes just above the
    # prompt; its summed and largest step time against `stage_times` of the plan.
    from dcpp.chunker import planner

    spec = PlanSpec(**{**spec.__dict__, "max_model_len": h0 + n + room})
    target = target_scale * float(model.predict_time(spec.max_num_batched_tokens, 0))
    expect = _rule_by_chunk(model, n, spec, target, h0)
    plan, k, tot, mx = planner.Rule(model, spec, target).sweep(n, h0)
    assert plan == expect and k == len(expect)
    s = planner.stage_times(model, plan, h0)
    assert tot == pytest.approx(float(s.sum()), rel=1e-9)
    assert mx == pytest.approx(float(s.max()), rel=1e-9)


def test_rule_pass_over_a_million_tokens_equals_the_rule_chunk_by_chunk():
    # Long runs of equal chunks (hundreds of 512s) are where a run-at-once pass could drift.
    model = HistoryLatencyModel(alpha=2e-9, beta=4e-9, gamma=2e-6, delta=1e-9, c=2e-3)
    spec = PlanSpec(max_num_batched_tokens=2048, max_model_len=1 << 20, num_stages=2,
                    min_chunk=256)
    for target in (0.01, 0.3, 2.1, 40.0):
        plan = rule_plan(model, (1 << 20) - 1, spec, target)
        assert plan == _rule_by_chunk(model, (1 << 20) - 1, spec, target, 0)
        assert len(set(plan)) < len(plan) / 4  # the case of interest: long runs


def test_pipeline_search_needs_few_rule_passes(monkeypatch):
    # Planning cost is rule passes over the prompt; count them (not time them) for a
    # 1M-token prompt and a 30k one under a telescoping step-cost model.
    from dcpp.chunker import planner

    passes = []
    sweep = planner.Rule.sweep

    def counted(self, *args, **kwargs):
        out = sweep(self, *args, **kwargs)
        passes.append(out[1])
        return out

    monkeypatch.setattr(planner.Rule, "sweep", counted)
    model = HistoryLatencyModel(alpha=2e-9, beta=4e-9, gamma=2e-6, delta=0.0, c=2e-3)
    spec = PlanSpec(max_num_batched_tokens=2048, max_model_len=1 << 20, num_stages=2,
                    min_chunk=256)
    for n, most in ((30_000, 8), ((1 << 20) - 1, 6)):
        passes.clear()
        plan = pipeline_plan(model, n, spec)
        assert len(passes) <= most, (n, len(passes))
        # ... and the plan is as good as a dense scan over the target time finds, up to the
        # share of the objective the search may leave (a few `search_rtol`).
        scan = min(plan_cost(model, rule_plan(model, n, spec, m), 2)
                   for m in np.geomspace(2.1e-3, 0.2 if n < 10**5 else 4.0, 400))
        cost = plan_cost(model, plan, 2)
        assert cost <= scan * (1 + 3 * planner.search_rtol(cost)), (n, cost / scan)
    # Prompts the scheduler benchmark plans (16k-32k): few passes for each.
    counts = []
    for n in np.random.default_rng(0).integers(16_384, 32_768, 40):
        passes.clear()
        pipeline_plan(model, int(n), spec)
        counts.append(len(passes))
    assert np.median(counts) <= 7 and max(counts) <= 16, counts


@settings(max_examples=150, deadline=None)
@given(model=st.one_of(models, st.builds(HistoryLatencyModel.from_cost, a=st.floats(1e-11, 1e-9),
                                         b=st.floats(1e-7, 2e-5), c=st.floats(1e-4, 0.01))),
       p=st.integers(2, 8), budget_units=st.integers(4, 64), floor_units=st.integers(1, 8),
       n_budgets=st.floats(2.5, 200.0), h0=st.sampled_from([0, 4096, 100_000]))
def test_opens_with_budget_only_when_the_plan_does(model, p, budget_units, floor_units,
                                                   n_budgets, h0):
    # The scheduler takes vLLM's chunk before planning when this says so; the plan itself is
    # the oracle.
    from dcpp.chunker.planner import opens_with_budget

    b = 64 * budget_units
    spec = PlanSpec(max_num_batched_tokens=b, max_model_len=10**7, num_stages=p,
                    min_chunk=64 * min(floor_units, budget_units))
    n = int(n_budgets * b)
    if opens_with_budget(model, n, spec, h0):
        assert default_plan(model, n, spec, h0)[0] == b


def test_opens_with_budget_for_long_prompts_and_a_small_budget():
    # The case it is for (the scheduler benchmark's): 16k-32k prompts, budget 2048.
    from dcpp.chunker.planner import opens_with_budget

    model = HistoryLatencyModel(alpha=2e-9, beta=4e-9, gamma=2e-6, delta=0.0, c=2e-3)
    spec = PlanSpec(max_num_batched_tokens=2048, max_model_len=1 << 20, num_stages=2,
                    min_chunk=256)
    ns = np.random.default_rng(1).integers(16_384, 32_768, 20)
    assert all(opens_with_budget(model, int(n), spec) for n in ns)
    assert not opens_with_budget(model, 5000, spec)  # <= 2.5 budgets: never put off
    assert not opens_with_budget(model, 30_000, PlanSpec(**{**spec.__dict__, "smooth_factor": 0.5}))
