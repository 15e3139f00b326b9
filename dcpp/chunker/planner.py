"""Chunk plans for one prompt under a latency model (DESIGN.md §2).

Objective: with P identical stages and chunk i taking s_i on each stage, the prefill's TTFT is
``sum(s) + (P-1)*max(s)`` (proportionate flow shop). It is invariant to scaling the model, so a
model of the whole forward (t) and of one stage (t/P) give the same plans.

* `static_plan`: fixed ``max_num_batched_tokens`` chunks (vLLM's default).
* `equal_time_plan`: vllm-ascend's / SGLang's rule, every chunk takes t(base, 0).
* `pipeline_plan`: the same per-chunk rule with the target time chosen by dcpp: for chunk
  counts K around the lower bound's best K, the smallest target giving K chunks (equal-time K
  chunks), walking while the objective improves (more chunks shrink the fill/drain term, each
  costs the fixed step cost c); a few rule passes (median 6 for 16k-32k tokens, 5 at 1M).
* `default_plan`: the best of static, equal-time and, where the work telescopes, the pipeline
  plan, otherwise (beta != 2*alpha or delta > 0: every fit seen so far) the free-then-tight
  plan (`ramp_search.ramp_plan`: the optimal plan's shape under a cap on the step time, a
  golden-section search over that cap, <= 14 prices of a few dozen closed-form steps each),
  under the model, so never worse than equal-time. `dp_default_plan` is the planner before
  (the pipeline search plus a coarse DP, 15-35 ms), kept as the reference.
* `optimal_plan`: TeraPipe-style DP: for a cap M on chunk time, the least ``sum(s)`` over an
  aligned token grid; the best ``S(M) + (P-1)*max`` over M, found by branch and bound.
* `lower_bound`: ``min_K L(K) + (P-1) * M(K)`` with relaxations of a K-chunk plan's summed
  and largest step time.

The rule and the fixed plans live in `rule.py`, the bound in `bounds.py`, the DP in
`optimal.py`; this module holds the search and re-exports them.
"""

from __future__ import annotations

import math

from dcpp.chunker.bounds import bound_argmin, bound_with_steps_below, lower_bound
from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.optimal import optimal_plan
from dcpp.chunker.ramp import free_size
from dcpp.chunker.ramp_search import ramp_plan
from dcpp.chunker.rule import (ALIGN_MIN, PlanSpec, Rule, check_prompt, equal_time_plan,
                               equal_time_target, plan_cost, rule_chunk, rule_plan,
                               stage_times, static_plan)

__all__ = ["ALIGN_MIN", "PlanSpec", "Rule", "check_prompt", "default_plan", "dp_default_plan",
           "equal_time_plan", "ramp_applies",
           "equal_time_target", "lower_bound", "opens_with_budget", "optimal_plan",
           "pipeline_plan", "plan_cost", "rule_chunk", "rule_plan", "search_rtol",
           "stage_times", "static_plan"]

DEFAULT_DP_POINTS = 256
"""Grid boundaries of the coarse DP candidate in `default_plan`."""


BISECT_RTOL = 1e-3
"""Finest relative precision of the smallest target time giving k chunks (a target 0.1% above
it moves the plan's objective by far less: only the last chunk changes)."""

OBJ_RTOL = 1e-4
"""Share of the objective the walk over chunk counts treats as no gain."""

OBJ_ATOL_S = 1e-3
"""Seconds of the objective one count's target search may leave (at least `OBJ_RTOL` of it,
at most `OBJ_RTOL_MAX`): the models are per stage, so the objective is a predicted TTFT, and
a millisecond of it is worth less than the passes that would find it inside the scheduler's
step (cold-cache passes cost ~0.1 ms each there, paid by every request in the step)."""

OBJ_RTOL_MAX = 1e-3
"""Largest share of the objective one count's target search may leave (short prompts)."""


def search_rtol(objective: float) -> float:
    """The share of an ``objective`` (seconds) one count's target search may leave."""
    if objective <= 0:
        return OBJ_RTOL
    return min(max(OBJ_RTOL, OBJ_ATOL_S / objective), OBJ_RTOL_MAX)


class _TargetSearch:
    """Rule passes over one prompt at chosen target times (each pass is a valid plan, kept with
    its objective terms), and the smallest target giving at most k chunks. The chunk count
    falls as the target grows; the fractional count ``kappa = chunks - 1 + t(last chunk) /
    target`` falls with it, nearly continuously through each boundary (just below it the last
    chunk is small, at it the last chunk is full; a merged tail makes it jump), so
    interpolating kappa against 1 / (target - c0) (count ~ work / (target - fixed cost)) lands
    near the boundary in a few passes."""

    def __init__(self, model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                 history: int) -> None:
        self.rule = Rule(model, spec, 0.0)
        self.n, self.h = prompt_len, history
        self.c0 = float(model.predict_time(0, history))  # a step with no new tokens
        self.obj_rtol = OBJ_RTOL
        """Share of the objective the search may leave (`search_rtol`)."""
        self.runs: dict[float, tuple[int, float, float, float]] = {}
        """target -> (chunks, kappa, summed time, largest time)."""
        self._plans: dict[float, list[int]] = {}

    def run(self, m: float) -> tuple[int, float, float, float]:
        if m not in self.runs:
            self.rule.target = m
            plan, k, tot, mx = self.rule.sweep(self.n, self.h, keep=True)
            last = self.rule.t(plan[-1], self.h + self.n - plan[-1])
            self.runs[m] = (k, k - 1 + min(last / m, 1.0), tot, mx)
            self._plans[m] = plan
        return self.runs[m]

    def _bracket(self, k: int, m_lo: float, m_hi: float) -> tuple[float, float]:
        """Targets lo < hi with > k chunks at lo and <= k at hi (lo = m_lo when even m_lo gives
        <= k chunks). Missing ends are extrapolated from the nearest run with kappa ~ W / (m -
        c0), W from that run, aiming just past the boundary."""
        for _ in range(8):
            lo = max((m for m, r in self.runs.items() if r[0] > k), default=None)
            hi = min((m for m, r in self.runs.items() if r[0] <= k), default=None)
            if lo is not None and hi is not None:
                return lo, hi
            if lo is None and hi is None:
                self.run(m_hi)
                continue
            near, aim, edge = (hi, k + 0.5, m_lo) if lo is None else (lo, k - 0.5, m_hi)
            work = self.runs[near][1] * (near - self.c0)
            guess = self.c0 + work / aim if near > self.c0 and aim > 0 else edge
            if lo is None:
                guess = m_lo if not m_lo < guess < near else guess
            else:
                guess = m_hi if not near < guess < m_hi else guess
            if guess in self.runs:  # an edge already run: nothing further out to try
                break
            self.run(guess)
        lo = max((m for m, r in self.runs.items() if r[0] > k), default=m_lo)
        hi = min((m for m, r in self.runs.items() if r[0] <= k), default=m_hi)
        self.run(lo)
        self.run(hi)
        return lo, hi

    def cheapest(self, p1: int) -> float:
        """The target of the cheapest pass run (every pass is a valid plan; ties: fewer
        chunks)."""
        return min(self.runs, key=lambda m: (self.runs[m][2] + p1 * self.runs[m][3],
                                             self.runs[m][0]))

    def best(self, p1: int) -> tuple[list[int], float]:
        """(plan, objective) of the cheapest pass run."""
        m = self.cheapest(p1)
        r = self.runs[m]
        return list(self._plans[m]), r[2] + p1 * r[3]

    def smallest_target(self, k: int, m_lo: float, m_hi: float,
                        rtol: float) -> tuple[float, int]:
        """(m, j): m within ``rtol`` above the smallest target giving <= k chunks (``m_lo`` if
        even that gives <= k; the bracket starts from the targets already run), and j the chunk
        count just below m (the next larger count: counts in between have no plan)."""
        lo, hi = self._bracket(k, m_lo, m_hi)
        if self.runs[lo][0] <= k:
            return lo, self.runs[lo][0]
        side, streak = -1, 0
        p1 = self.rule.p1
        while hi - lo > rtol * hi:
            chunks, kappa = self.runs[hi][:2]
            if chunks == k and p1 * (k - kappa) <= self.obj_rtol * k * (k + p1):
                # Close enough: with the last chunk this full, the boundary lies at most ~
                # (1 - fill) / k below hi, worth < obj_rtol of the objective ~ (k + p1) * m.
                break
            gap = rtol * hi
            guess = math.sqrt(lo * hi) if lo > 0 else 0.5 * (lo + hi)
            f_lo, f_hi = self.runs[lo][1] - k, self.runs[hi][1] - k  # > 0, <= 0
            if streak < 2 and lo > self.c0 and f_lo > f_hi:
                # Regula falsi on kappa against 1 / (target - c0); bisection after two
                # probes on one side (kappa jumps where the rule merges a tail).
                x_lo, x_hi = 1.0 / (lo - self.c0), 1.0 / (hi - self.c0)
                x = x_lo + (x_hi - x_lo) * f_lo / (f_lo - f_hi)
                if x > 0 and lo < self.c0 + 1.0 / x < hi:
                    guess = self.c0 + 1.0 / x
            # Near an end, probe one gap inside it: the probe closes the bracket or moves it.
            if hi - guess < 0.5 * gap:
                guess = hi - 0.99 * gap
            elif guess - lo < 0.5 * gap:
                guess = lo + 0.99 * gap
            new_side = 1 if self.run(guess)[0] <= k else 0
            if new_side:
                hi = guess
            else:
                lo = guess
            streak = streak + 1 if new_side == side else 0
            side = new_side
        return hi, self.runs[lo][0]


def pipeline_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                  history: int = 0) -> list[int]:
    """The rule's plan at the target time that minimises the pipeline objective."""
    check_prompt(prompt_len, history, spec)
    if spec.smooth_factor == 0:
        return static_plan(prompt_len, spec, history)
    return _pipeline_search(model, prompt_len, spec, history)[0]


def _pipeline_search(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                     history: int) -> tuple[list[int], float]:
    """(`pipeline_plan`, its objective in seconds); no numpy (planning runs inside the
    scheduler's step, where every extra library call is a cold one)."""
    p1 = spec.num_stages - 1
    search = _TargetSearch(model, prompt_len, spec, history)
    m_lo = float(model.predict_time(1, history))  # every chunk at its floor
    m_hi = float(model.predict_time(spec.max_num_batched_tokens, history + prompt_len))
    # Every count lies in [k_min, k_max]: no chunk exceeds the budget, none but the last is
    # below the floor.
    k_min = -(-prompt_len // spec.max_num_batched_tokens)
    k_max = -(-prompt_len // spec.floor)
    if p1 == 0 or k_min >= k_max:  # nothing to trade: the budget-sized or equal-time plan
        search.run(m_hi)
        search.run(equal_time_target(model, spec))
        return search.best(p1)

    # Start at the chunk count minimising the lower bound's relaxation (the model's own
    # terms, no alignment or budget caps), then walk over the distinct plans on both sides
    # while the objective improves by more than OBJ_RTOL of it. The answer is the
    # cheapest pass seen: the tail-merge and smoothing rules make the objective uneven within
    # a count.
    k_arg, bound0, m0 = _search_start(model, prompt_len, spec, history)
    k0 = min(max(k_arg, k_min), k_max)
    search.obj_rtol = obj_rtol = search_rtol(bound0)
    search.run(m0)

    def rtol(k: int) -> float:
        """Target precision for k chunks: a target x above the boundary raises the objective
        ~ (k + p1) * m by ~ p1 * x * m, so obj_rtol of the objective allows this much."""
        return max(BISECT_RTOL, obj_rtol * (k + p1) / p1)

    scores: dict[int, float] = {}  # chunk count -> objective of its smallest-target plan
    below: dict[int, int] = {}  # chunk count -> the next larger count that has a plan

    def score(k: int) -> int:
        """Evaluate the plan with at most k chunks; returns its chunk count."""
        m, j = search.smallest_target(k, m_lo, m_hi, rtol(k))
        got, _, tot, mx = search.run(m)
        scores.setdefault(got, tot + p1 * mx)
        below[got] = j
        return got

    k = score(k0)
    for up in (True, False):
        cur, worse = k, 0
        while worse < 1:
            nxt = below[cur] if up else cur - 1
            if not k_min <= nxt <= k_max or nxt == cur:
                break
            nxt = score(nxt)
            if nxt == cur:
                break
            # Near the optimum the objective is flat: a gain below OBJ_RTOL counts as none.
            worse = worse + 1 if scores[nxt] > scores[cur] * (1 - OBJ_RTOL) else 0
            cur = nxt
    # Never worse than the equal-time plan: run it unless the bound rules it out. Its chunks
    # but the last take at most its target (or a floor chunk's time at the end, or smoothed,
    # a cap chunk's).
    m_et = equal_time_target(model, spec)
    h_end = history + prompt_len
    step_max = max(m_et if spec.smooth_factor == 1 else float(model.predict_time(spec.cap, h_end)),
                   float(model.predict_time(spec.floor, h_end)))
    if bound_with_steps_below(model, prompt_len, spec, history, step_max, k_arg) < search.best(p1)[1]:
        search.run(m_et)
    return search.best(p1)


def _search_start(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                  history: int) -> tuple[int, float, float]:
    """(K, bound, m0): the lower bound's best chunk count and its value there, and the
    search's first target, the bound's largest step there within [t(1, history), t(budget,
    end)] (`opens_with_budget` reasons about that very pass)."""
    k, bound, top = bound_argmin(model, prompt_len, spec, history)
    m_lo = float(model.predict_time(1, history))
    m_hi = float(model.predict_time(spec.max_num_batched_tokens, history + prompt_len))
    return k, bound, min(max(top, m_lo), m_hi)


def opens_with_budget(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                      history: int = 0) -> bool:
    """Whether `default_plan` ("pipeline") provably starts with a budget-sized chunk, from
    the search's first rule pass and the lower bound (about a third of a plan's work).

    Rule passes whose first chunk is below the budget B run at targets below t(B, history),
    so each of their chunks but the last takes at most T = max(t(B, history), t(floor,
    end)) and the last at most t(B, end): a K-chunk one has L(K) <= (K - 1) * T + t(B, end),
    which holds only from some K_B on (the left side shrinks faster), and costs at least
    min over K >= K_B of the bound. If the first pass (which starts with B) is cheaper, the
    search's answer starts with B; so does the static plan, and where the ramp search (or
    the coarse DP) may run this says no."""
    b, p1 = spec.max_num_batched_tokens, spec.num_stages - 1
    if (spec.smooth_factor != 1 or spec.cap != b or p1 == 0 or prompt_len <= 2 * b
            or -(-prompt_len // b) >= -(-prompt_len // spec.floor)):
        return False
    check_prompt(prompt_len, history, spec)
    rule = Rule(model, spec, 0.0)
    if _chunking_matters(model, prompt_len, spec, history, rule.static_terms(prompt_len, history)[1]):
        return False
    k_arg, _, rule.target = _search_start(model, prompt_len, spec, history)
    plan, _, tot, mx = rule.sweep(prompt_len, history, keep=True)
    if plan[0] != b:
        return False
    t_max = max(float(model.predict_time(b, history)),
                float(model.predict_time(spec.floor, history + prompt_len)))
    return tot + p1 * mx < bound_with_steps_below(model, prompt_len, spec, history, t_max, k_arg)


def default_plan(model: HistoryLatencyModel | None, prompt_len: int, spec: PlanSpec,
                 history: int = 0, mode: str = "pipeline") -> list[int]:
    """dcpp's plan for ``mode`` ("pipeline" | "equal_time" | "static"). "pipeline" returns the
    cheapest under the model of the static and equal-time plans and, where the work
    telescopes, the pipeline plan, otherwise the free-then-tight plan (`ramp_applies`)."""
    if model is None or mode == "static" or spec.smooth_factor == 0 or not _costs_steps(model):
        return static_plan(prompt_len, spec, history)
    if mode == "equal_time":
        return equal_time_plan(model, prompt_len, spec, history)
    if mode != "pipeline":
        raise ValueError(f"mode={mode!r} must be one of pipeline, equal_time, static")
    check_prompt(prompt_len, history, spec)
    p1 = spec.num_stages - 1
    rule = Rule(model, spec, 0.0)
    _, work, top = rule.static_terms(prompt_len, history)
    cands = [(static_plan(prompt_len, spec, history), work + p1 * top)]
    path = ramp_applies(model, prompt_len, spec, history, work)
    if path == "ramp":
        plan, obj, _ = ramp_plan(model, prompt_len, spec, history)
        if plan:
            cands.append((plan, obj))
        rule.target = equal_time_target(model, spec)  # never worse than equal-time
        plan, _, tot, mx = rule.sweep(prompt_len, history)
        cands.append((plan, tot + p1 * mx))
    else:
        cands.append(_pipeline_search(model, prompt_len, spec, history))  # with equal-time
        if path == "dp":
            cands.append(_coarse_dp(model, prompt_len, spec, history))
    return min((c for c in cands if c[0]), key=lambda pc: (pc[1], len(pc[0])))[0]


def _costs_steps(model: HistoryLatencyModel) -> bool:
    """Whether a step at history 0 takes time under ``model`` (alpha, gamma or c > 0): without
    it there is no step time to balance and every plan is static."""
    return model.alpha > 0 or model.gamma > 0 or model.c > 0


def ramp_applies(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                 history: int = 0, work: float | None = None) -> str:
    """Which search `default_plan` runs beside the static and equal-time plans: "rule" (the
    pipeline search) where the work telescopes (`_chunking_matters`) or sigma < 1 (the rule's
    smoothed family is the plan asked for); "ramp" (`ramp_plan`) where it does not and the
    limits lie on the alignment grid, unless the floor exceeds the free size
    (`ramp.free_size`) at the prompt's end; "dp" (the pipeline search and the coarse DP,
    15-35 ms) there and for budgets below the alignment. ``work``: the static plan's summed
    time."""
    if work is None:
        work = Rule(model, spec, 0.0).static_terms(prompt_len, history)[1]
    if spec.smooth_factor != 1 or not _chunking_matters(model, prompt_len, spec, history, work):
        return "rule"
    if spec.cap % spec.align or spec.floor % spec.align:
        return "dp"
    # A floor above the free size to the prompt's end puts every free chunk at the floor
    # (min_chunk 4096 here: up to 17% worse than the DP at 12k tokens).
    if spec.floor > free_size(model, history + prompt_len):
        return "dp"
    return "ramp"


def dp_default_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                    history: int = 0) -> list[int]:
    """`default_plan` ("pipeline") before issue 20: the cheapest of the pipeline search, the
    static plan and, where chunking moves the work, a coarse DP (`optimal_plan` on <=
    `DEFAULT_DP_POINTS` boundaries, 15-35 ms). The reference the ramp plans are compared with
    (tests, benchmarks)."""
    if spec.smooth_factor == 0:
        return static_plan(prompt_len, spec, history)
    check_prompt(prompt_len, history, spec)
    p1 = spec.num_stages - 1
    _, work, top = Rule(model, spec, 0.0).static_terms(prompt_len, history)
    cands = [_pipeline_search(model, prompt_len, spec, history),
             (static_plan(prompt_len, spec, history), work + p1 * top)]
    if spec.smooth_factor == 1 and _chunking_matters(model, prompt_len, spec, history, work):
        cands.append(_coarse_dp(model, prompt_len, spec, history))
    return min((c for c in cands if c[0]), key=lambda pc: (pc[1], len(pc[0])))[0]


def _coarse_dp(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
               history: int) -> tuple[list[int], float]:
    try:
        dp = optimal_plan(model, prompt_len, spec, history, max_points=DEFAULT_DP_POINTS,
                          rel_tol=1e-3)
    except ValueError:
        return [], math.inf  # no plan on the coarse grid fits the limits
    return dp, plan_cost(model, dp, spec.num_stages, history)


def _chunking_matters(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                      history: int, work: float) -> bool:
    """Whether the prompt's work (``work``: the static plan's summed time) can depend on its
    chunking by more than `DP_WORTH` of it: the non-telescoping part of the attention term,
    |beta - 2*alpha| * (N^2/2 + N*H), plus the prefix term delta * H per chunk over the most
    chunks the floor allows. Fitted models are never exactly telescoping; where this is
    negligible the DP cannot find a better shape and is skipped."""
    n, h = float(prompt_len), float(history)
    quad = abs(model.beta - 2.0 * model.alpha) * (n * n / 2.0 + n * h)
    prefix = model.delta * (h + n) * (-(-prompt_len // spec.floor))
    return quad + prefix > DP_WORTH * work


DP_WORTH = 1e-3
"""Smallest share of a prompt's work that chunking must move for `default_plan` to leave the
pipeline search (for the ramp plans or the coarse DP)."""

