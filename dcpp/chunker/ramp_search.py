"""The cap on the step time for `ramp.RampPlan`: the plan minimising ``sum(s) + (P-1)*max(s)``
where the work depends on the chunking (beta != 2*alpha or delta > 0).

The objective as a function of the cap M is smooth and unimodal on log M for long prompts
(many chunks, the junction's rounding a small share) and ragged on a scale of a few percent of
M for short ones. Caps above the loosest plan's largest step all give that plan (a plateau),
so the search runs on log M over [0.9 t(floor, end), that step]: Brent's method to
`SEARCH_TOL` (on each half for short prompts), then one cap on each side of the best at
`LOCAL_SHARE` of it. A price costs tens of closed-form steps (`RampPlan.steps`), so a plan
costs at most `MAX_PRICES` of them whatever the prompt's length.
"""

from __future__ import annotations

import math

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.ramp import RampPlan
from dcpp.chunker.rule import PlanSpec

SEARCH_TOL = 0.02
"""Brent's method stops when it brackets the best log M to within about this (near the optimum
a 3% move of M changed the objective by < 1e-4 on the fitted models' grid)..."""

SEARCH_PRICES = 7
"""... or after this many prices, ..."""

LOCAL_SHARE = 0.012
"""... then one cap on each side of the best, this share of M away (short prompts' objective
is ragged on that scale)."""

SHORT_CHUNKS = 32
"""Prompts of at most this many floor chunks (the objective ragged on log M) ..."""

SHORT_PRICES = 6
"""... get a Brent search of this many prices on each half of the bracket (their prices are
cheap: few runs)."""

MAX_PRICES = 1 + max(SEARCH_PRICES, 2 * SHORT_PRICES) + 2
"""Most prices one plan runs (the loosest cap, the search, the two local caps)."""

_CG = (3.0 - math.sqrt(5.0)) / 2.0  # golden-section step


def _brent(f, a: float, b: float, tol: float, max_evals: int) -> None:
    """Brent's minimisation of ``f`` on [a, b] (parabolic steps, golden-section fallback), at
    most ``max_evals`` evaluations; ``f`` records the best point itself."""
    x = w = v = a + _CG * (b - a)
    fx = fw = fv = f(x)
    d = e = 0.0
    for _ in range(max_evals - 1):
        mid = 0.5 * (a + b)
        if abs(x - mid) <= 2.0 * tol - 0.5 * (b - a):
            return
        use_golden = True
        if abs(e) > tol:
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0:
                p = -p
            q = abs(q)
            if abs(p) < abs(0.5 * q * e) and q * (a - x) < p < q * (b - x):
                e, d = d, p / q  # parabolic step
                use_golden = False
                if (x + d) - a < 2 * tol or b - (x + d) < 2 * tol:
                    d = tol if x < mid else -tol
        if use_golden:
            e = (b - x) if x < mid else (a - x)
            d = _CG * e
        u = x + (d if abs(d) >= tol else (tol if d > 0 else -tol))
        fu = f(u)
        if fu <= fx:
            if u < x:
                b = x
            else:
                a = x
            v, w, x, fv, fw, fx = w, x, u, fw, fx, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, w, fv, fw = w, u, fw, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu


def ramp_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
              history: int = 0) -> tuple[list[int], float, RampPlan]:
    """(plan, objective in seconds, the `RampPlan` searched: its counters); ([], inf, ...)
    when no plan of the shape meets the limits."""
    rp = RampPlan(model, spec, prompt_len, history)
    end = history + prompt_len
    fl = min(spec.floor, prompt_len)
    b = min(spec.max_num_batched_tokens, prompt_len)
    m_lo = 0.9 * rp.t(fl, end - fl)
    m_hi = rp.t(b, end - b)
    best = [math.inf, None]
    memo: dict[float, float] = {}
    rp_best_cap = [m_hi]

    def f(x: float) -> float:
        if x not in memo:
            obj, key = rp.price(math.exp(x))
            memo[x] = obj
            if obj < best[0]:
                best[:] = [obj, key]
                rp_best_cap[0] = math.exp(x)
        return memo[x]

    lo, hi = math.log(m_lo), math.log(max(m_hi, m_lo))
    if rp.p1 and hi - lo > SEARCH_TOL:
        # Caps above the loosest plan's largest step give that same plan (a plateau Brent's
        # method would wander on): search below it.
        f(hi)
        if rp.top < m_hi:
            hi = max(lo, math.log(rp.top))
    if rp.p1 == 0 or hi - lo <= SEARCH_TOL:
        f(hi)  # no pipeline term (or no room): the loosest cap
    elif prompt_len <= SHORT_CHUNKS * spec.floor:
        # Few chunks: the objective is ragged on log M; search each half of the bracket.
        mid = 0.5 * (lo + hi)
        _brent(f, lo, mid, SEARCH_TOL, SHORT_PRICES)
        _brent(f, mid, hi, SEARCH_TOL, SHORT_PRICES)
        x0 = math.log(rp_best_cap[0])
        f(x0 + LOCAL_SHARE)
        f(x0 - LOCAL_SHARE)
    else:
        _brent(f, lo, hi, SEARCH_TOL, SEARCH_PRICES)
        x0 = math.log(rp_best_cap[0])
        f(x0 + LOCAL_SHARE)
        f(x0 - LOCAL_SHARE)
    if best[1] is None:
        return [], math.inf, rp
    return rp.plan(best[1]), best[0], rp
