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
* `default_plan`: the best of static, equal-time and, where the work telescopes (or a high
  floor leaves the sizes little room), the pipeline plan, otherwise the fitted plan
  (`fit_plan`), under the model, so never worse than equal-time; the fitted search costs
  about what the pipeline search does (a few to ~35 passes of about a rule pass each, no DP;
  `fit_applies` says which search runs).
* `fit_plan`: where the work depends on the chunking (beta != 2*alpha, delta > 0), the shape
  of the DP optimum (`rule.TightFit`): free chunks in front (a ramp of the sizes minimising
  the summed time), tight ones from the end (as large as a cap on the step time allows),
  searched over that cap; `dp_default_plan` is the planner before it (a coarse DP, 15-35 ms)
  kept for comparison.
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
from dcpp.chunker.rule import (ALIGN_MIN, PlanSpec, Rule, TightFit, check_prompt,
                               equal_time_plan, equal_time_target, plan_cost, rule_chunk,
                               rule_plan, stage_times, static_plan)

__all__ = ["ALIGN_MIN", "PlanSpec", "Rule", "TightFit", "check_prompt", "default_plan",
           "dp_default_plan", "equal_time_plan", "equal_time_target", "fit_applies", "fit_plan",
           "lower_bound", "opens_with_budget", "optimal_plan", "pipeline_plan", "plan_cost",
           "rule_chunk", "rule_plan", "search_rtol", "stage_times", "static_plan"]

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
    search's answer starts with B; so does the static plan, and where the work depends on the
    chunking (the fitted search, or the coarse DP, may run) this says no."""
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
    cheapest of the static and equal-time plans and, where the work telescopes, the pipeline
    plan (`pipeline_plan`), otherwise the fitted plan (`fit_plan`)."""
    if model is None or mode == "static" or spec.smooth_factor == 0:
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
    path = fit_applies(model, prompt_len, spec, history, work)
    if path == "fit":
        # The work depends on the chunking (prefix term delta, beta != 2*alpha): equal-time
        # chunks are not the best shape for a chunk count; the fitted family is (`TightFit`).
        cands.append(_fit_search(model, prompt_len, spec, history))
        rule.target = equal_time_target(model, spec)  # never worse than equal-time
        plan, _, tot, mx = rule.sweep(prompt_len, history)
        cands.append((plan, tot + p1 * mx))
    else:
        cands.append(_pipeline_search(model, prompt_len, spec, history))  # with equal-time
        if path == "dp":
            cands.append(_coarse_dp(model, prompt_len, spec, history))
    return min((c for c in cands if c[0]), key=lambda pc: (pc[1], len(pc[0])))[0]


def dp_default_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                    history: int = 0) -> list[int]:
    """`default_plan` ("pipeline") as it was before the fitted plans: the cheapest of the
    pipeline search, the static plan and, where chunking moves the work, a coarse DP
    (`optimal_plan` on <= `DEFAULT_DP_POINTS` boundaries, 15-35 ms). Kept as the reference the
    fitted plans are compared with (tests, benchmarks/plan_grid.py)."""
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


def fit_applies(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, history: int = 0,
                work: float | None = None) -> str:
    """Which search `default_plan` adds to the static plan: "fit" (`_fit_search`) where the
    work depends on the chunking (`_chunking_matters`), sigma = 1 and the limits are on the
    grid with room between floor and cap (floor <= `FIT_MAX_FLOOR` * cap); "rule" (the
    pipeline search) where the work telescopes or a high floor leaves the sizes little room
    (the rule's counts and tails matter more than the shape there); "dp" (the pipeline search
    and the coarse DP, 15-35 ms) where the work depends on the chunking but the limits are off
    the grid (budgets below the alignment). ``work``: the static plan's summed time."""
    if work is None:
        work = Rule(model, spec, 0.0).static_terms(prompt_len, history)[1]
    if spec.smooth_factor != 1 or not _chunking_matters(model, prompt_len, spec, history, work):
        return "rule"
    if not (spec.cap >= spec.align and spec.cap % spec.align == 0 and spec.floor % spec.align == 0):
        return "dp"
    return "fit" if spec.floor <= FIT_MAX_FLOOR * spec.cap else "rule"


FIT_MAX_FLOOR = 0.5
"""The fitted family needs room between the floor and the cap (on random models with floors
above half the cap it was up to 6% worse than the rule, below it within 0.7% of the DP)."""

FIT_BRACKET = (0.9, 2.2)
"""`_fit_search` looks for the cap on the tight chunks between these multiples of
`_fit_start`'s mean step (the best plan's largest step was 1.05-1.9 times it on the grid of
fitted models x 3k-1M tokens x P 2-8)..."""

FIT_SMALL_K = 12
"""... up to this many chunks (`_fit_start`'s count), where the objective is ragged on that
scale (a few plans per chunk's worth of cap, 1/K), ..."""

FIT_SMALL_BRACKET = (1.0, 1.7)
"""... these multiples of the mean step (1.05-1.6 on the grid for such prompts), ..."""

FIT_SMALL_SHARE = 0.3
"""... in steps of this share of a chunk's worth (a pass costs ~K steps: cheap here), then
like the others (`FIT_LOCAL_PASSES`)."""

FIT_COARSE_TOL = 0.01
"""Above FIT_SMALL_K chunks by Brent's method on the cap's logarithm (smooth on that scale)
to this precision..."""

FIT_COARSE_PASSES = 8
"""... in at most this many passes, ..."""

FIT_LOCAL_PASSES = 3
"""... then this many distinct tight passes on each side of its best (the objective is ragged
within a chunk's worth of cap)."""

FIT_LARGE_K = 64
"""From this many chunks on, the front's shape and the rounding move the objective little:
candidates only near the crossing (`FIT_LARGE_NEAR`), `FIT_LARGE_PASSES` Brent passes and no
local scan."""

FIT_LARGE_NEAR = 0.95

FIT_POLISH_K = 12
"""Plans of at most this many chunks get `TightFit.polish` (their end effects weigh most)..."""

FIT_POLISH_ROUNDS = 3
"""... up to this many times (while it improves), within two units of the plan's boundaries
up to `FIT_POLISH_WIDE_K` chunks, else one."""

FIT_POLISH_WIDE_K = 6

FIT_LARGE_PASSES = 4

_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def _brent(f, a: float, b: float, tol: float, max_evals: int) -> None:
    """Brent's minimisation of ``f`` on [a, b] (parabolic steps, golden-section fallback) to
    an absolute precision ``tol`` in at most ``max_evals`` evaluations; ``f`` keeps the best
    point itself."""
    cg = 1.0 - _PHI
    x = w = v = a + cg * (b - a)
    fx = fw = fv = f(x)
    d = e = 0.0
    for _ in range(max_evals - 1):
        m = 0.5 * (a + b)
        if abs(x - m) <= 2.0 * tol - 0.5 * (b - a):
            return
        p = q = r = 0.0
        if abs(e) > tol and fx < math.inf and fw < math.inf and fv < math.inf:
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0:
                p = -p
            q = abs(q)
            r, e = e, d
        if abs(p) < abs(0.5 * q * r) and q * (a - x) < p < q * (b - x):
            d = p / q
            if x + d - a < 2.0 * tol or b - x - d < 2.0 * tol:
                d = tol if x < m else -tol
        else:
            e = (b if x < m else a) - x
            d = cg * e
        u = x + (d if abs(d) >= tol else (tol if d > 0 else -tol))
        fu = f(u)
        if fu <= fx:
            if u < x:
                b = x
            else:
                a = x
            v, w, x = w, x, u
            fv, fw, fx = fw, fx, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, w = w, u
                fv, fw = fw, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu


def fit_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
             history: int = 0) -> list[int]:
    """The best plan of the fitted family (`TightFit`: free chunks in front, tight ones from
    the end) that `_fit_search` finds; needs sigma = 1 and limits on the grid (`fit_applies`)."""
    check_prompt(prompt_len, history, spec)
    return _fit_search(model, prompt_len, spec, history)[0]


def _fit_start(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
               history: int) -> tuple[int, float]:
    """(K, mean step) of the best equal-chunk plan: K chunks of N/K sum to
    T0 + kappa*N^2/K + delta*(K*H0 + N*(K-1)/2) + K*c; minimised with the pipeline term
    (P-1) * sum / K over K by ternary search (convex in K)."""
    n, h0, m = float(prompt_len), float(history), model
    p1 = spec.num_stages - 1
    fixed = 0.5 * m.beta * ((h0 + n) ** 2 - h0 * h0) + m.gamma * n
    kap = m.alpha - 0.5 * m.beta

    def work(k: int) -> float:
        return fixed + kap * n * n / k + m.delta * (k * h0 + 0.5 * n * (k - 1)) + k * m.c

    def f(k: int) -> float:
        w = work(k)
        return w + p1 * w / k

    lo = -(-prompt_len // spec.max_num_batched_tokens)
    hi = max(lo, prompt_len // spec.floor + 1)
    while hi - lo > 2:
        k1, k2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if f(k1) <= f(k2):
            hi = k2
        else:
            lo = k1
    k = min(range(lo, hi + 1), key=f)
    return k, work(k) / k


def _fit_search(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                history: int, fit: TightFit | None = None) -> tuple[list[int], float]:
    """(plan, objective) of the fitted family: the best of its plans over the cap m on the
    tight chunks, a scan (few chunks) or Brent's method and a local scan (see the FIT_*
    constants): 10-27 tight passes (`TightFit.passes`) from 3k to 30k tokens, 5 beyond, and
    at most ~500 front-table steps (`TightFit.table_steps`); no numpy. ``fit`` (tests): the
    `TightFit` to search with."""
    fit = fit if fit is not None else TightFit(model, spec, prompt_len, history)
    b = spec.max_num_batched_tokens
    end = history + prompt_len
    m_hi = float(model.predict_time(min(b, prompt_len), end - min(b, prompt_len)))
    m_lo = min(float(model.predict_time(spec.floor, history + max(0, prompt_len - spec.cap - b))),
               m_hi) * 0.999
    x_lo, x_hi = math.log(m_lo), math.log(m_hi)
    k0, m0 = _fit_start(model, prompt_len, spec, history)
    best = [math.inf, m_hi, None]  # objective, cap, key
    memo: dict[float, float] = {}
    table = not fit.steep

    def run(x: float) -> float:
        x = min(max(x, x_lo), x_hi)
        if x not in memo:
            f, key, _ = fit.run(math.exp(x), table=table)
            memo[x] = f
            if f < best[0]:
                best[:] = [f, math.exp(x), key]
        return memo[x]

    def walk(x: float, up: bool, steps: int, stop: float) -> None:
        """From cap e^x through the next ``steps`` caps that change the tight pass (each
        pass knows the caps that give the same pass, `TightFit.window`)."""
        for _ in range(steps):
            run(x)
            lo_m, hi_m = fit.window
            if up:
                if not hi_m < math.inf:
                    return
                x = max(math.log(hi_m) + 1e-9, x + 1e-9)
                if x > stop:
                    return
            else:
                if not lo_m > 0:
                    return
                x = min(math.log(lo_m) - 1e-9, x - 1e-9)
                if x < stop:
                    return

    if k0 <= FIT_SMALL_K:
        # Few chunks: the objective is ragged on the scale of the bracket; scan it, then
        # visit the distinct passes next to the best.
        x = max(math.log(m0 * FIT_SMALL_BRACKET[0]), x_lo)
        top, step = min(math.log(m0 * FIT_SMALL_BRACKET[1]), x_hi), math.log1p(FIT_SMALL_SHARE / k0)
        while x <= top + 1e-12:
            run(x)
            x += step
        if best[2] is not None:
            x0 = math.log(best[1])
            walk(x0, True, FIT_LOCAL_PASSES + 1, x_hi)
            walk(x0, False, FIT_LOCAL_PASSES + 1, x_lo)
    else:
        large = k0 > FIT_LARGE_K
        if large:
            fit.near = FIT_LARGE_NEAR
        lo = min(max(math.log(m0 * FIT_BRACKET[0]), x_lo), x_hi)
        hi = max(min(math.log(m0 * FIT_BRACKET[1]), x_hi), lo)
        _brent(run, lo, hi, FIT_COARSE_TOL, FIT_LARGE_PASSES if large else FIT_COARSE_PASSES)
        if best[2] is not None and not large:
            # The neighbouring passes (the objective is ragged within a chunk's worth of cap).
            x0 = math.log(best[1])
            walk(x0, True, FIT_LOCAL_PASSES + 1, x_hi)
            walk(x0, False, FIT_LOCAL_PASSES + 1, x_lo)
    if best[2] is None:
        return [], math.inf
    plan = fit.plan(best[1], best[2])
    cost = fit.cost(plan)
    if len(plan) <= FIT_POLISH_K:
        radius = 2 if len(plan) <= FIT_POLISH_WIDE_K else 1
        for _ in range(FIT_POLISH_ROUNDS):  # each round moves boundaries by up to a radius
            new = fit.polish(plan, radius)
            new_cost = fit.cost(new)
            if not new_cost < cost:
                break
            plan, cost = new, new_cost
    return plan, cost


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
"""Smallest share of a prompt's work that chunking must be able to move for `default_plan` to
try the coarse DP (a few to tens of ms per long prompt)."""

