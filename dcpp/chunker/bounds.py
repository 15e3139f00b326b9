"""Lower bounds on a prompt's TTFT under a latency model: any K-chunk plan within the limits
sums to at least L(K) and has a step of at least M(K), so its objective is at least
L(K) + (P-1) * M(K)."""

from __future__ import annotations

import math

import numpy as np

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.rule import PlanSpec, check_prompt

def lower_bound(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, history: int = 0) -> float:
    """A TTFT no plan within the limits can beat: ``min_K L(K) + (P-1) * M(K)`` where L(K)
    lower-bounds the summed stage time of any K-chunk plan (exact when the model telescopes,
    as ``--cost`` does: L(K) = work + K*c) and M(K) its largest step: at least the mean
    L(K)/K and, for K >= 2, the time of a floor-sized chunk where the second-to-last chunk
    starts at the earliest (the last two are at most budget and cap long)."""
    check_prompt(prompt_len, history, spec)
    _, work, top = bound_curve(model, prompt_len, spec, history)
    return float(np.min(work + (spec.num_stages - 1) * top))


def bound_argmin(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                  history: int) -> tuple[int, float, float]:
    """(K, bound, M(K)) at the count minimising `lower_bound`'s L(K) + (P-1) * M(K), by
    ternary search over the integers (both terms are convex in K), in plain Python."""
    p1 = spec.num_stages - 1
    ks, work, top = bound_terms(model, prompt_len, spec, history)

    def f(k: int) -> float:
        return work(k) + p1 * top(k)

    lo, hi = ks
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if f(m1) <= f(m2):
            hi = m2
        else:
            lo = m1
    k = min(range(lo, hi + 1), key=f)
    return k, f(k), top(k)


def bound_with_steps_below(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                           history: int, step_max: float, k_arg: int) -> float:
    """The least objective bound over plans whose chunks but the last each take at most
    ``step_max`` seconds (the last at most a budget chunk at the end): a K-chunk one needs
    L(K) <= (K - 1) * step_max + t(budget, end), which holds from some K on (the left side
    shrinks faster, as step_max is at least the per-chunk part of L); the bound is convex in
    K, so its least value from there is at that K or at ``k_arg`` (`bound_argmin`'s).
    Infinite if no such plan fits the limits."""
    p1 = spec.num_stages - 1
    (k_lo, k_hi), work, top = bound_terms(model, prompt_len, spec, history)
    m_end = float(model.predict_time(spec.max_num_batched_tokens, history + prompt_len))

    def fits(k: int) -> bool:
        return work(k) <= (k - 1) * step_max + m_end

    if not fits(k_hi):
        return math.inf
    lo, hi = k_lo, k_hi  # the smallest K that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    k = max(lo, k_arg)
    return work(k) + p1 * top(k)


def bound_curve(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                 history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([K] chunk counts, [K] L(K), [K] M(K)) over the counts the limits allow (seconds)."""
    (k_lo, k_hi), work, top = bound_terms(model, prompt_len, spec, history)
    k = np.arange(k_lo, k_hi + 1, dtype=float)  # [K candidates]
    return k, work(k), top(k)


def bound_terms(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, history: int):
    """((K_lo, K_hi), L, M): the chunk counts the limits allow, and lower bounds L(K) and M(K)
    on the summed and the largest stage time of any K-chunk plan (see `lower_bound`), as
    functions of an int K or an array of them."""
    n, h0, m = float(prompt_len), float(history), model
    k_lo = -(-prompt_len // spec.max_num_batched_tokens)
    k_hi = max(k_lo, prompt_len // spec.floor + 1)
    # sum alpha*C^2 + beta*C*H = (alpha - beta/2)*sum C^2 + beta*((h0+n)^2 - h0^2)/2, and
    # sum C^2 >= n^2 / K (or, when it counts negatively, <= n * budget).
    quad = m.beta * ((h0 + n) ** 2 - h0 ** 2) / 2
    coef = m.alpha - m.beta / 2
    fixed = quad + m.gamma * n + (0.0 if coef >= 0 else coef * n * min(n, spec.max_num_batched_tokens))
    start = history + max(0, prompt_len - spec.cap - spec.max_num_batched_tokens)
    floored = float(m.predict_time(spec.floor, start))

    def work(k):
        return fixed + (coef * n * n / k if coef >= 0 else 0.0) + m.delta * k * h0 + k * m.c

    def top(k):
        if isinstance(k, np.ndarray):
            return np.maximum(work(k) / k, np.where(k >= 2, floored, 0.0))
        return max(work(k) / k, floored) if k >= 2 else work(k) / k

    return (k_lo, k_hi), work, top
