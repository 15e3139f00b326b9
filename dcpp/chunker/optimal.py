"""TeraPipe-style DP optimum on an aligned token grid (the planners' reference)."""

from __future__ import annotations

import heapq
import math

import numpy as np

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.rule import PlanSpec, check_prompt, stage_times

def _dp_grid(prompt_len: int, spec: PlanSpec, grid: int | None, max_points: int) -> int:
    a = spec.align
    if grid is None:
        grid = a * max(1, -(-prompt_len // (a * max_points)))
        grid = min(grid, max(a, spec.cap - spec.cap % a))  # a chunk must fit the budget
    if grid < 1:
        raise ValueError(f"grid={grid} must be >= 1 token")
    return grid


def optimal_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, history: int = 0,
                 *, grid: int | None = None, max_points: int = 1024,
                 rel_tol: float = 1e-4) -> list[int]:
    """Minimise ``sum(s) + (P-1)*max(s)`` over plans whose boundaries lie on a grid of ``grid``
    tokens (default: the alignment, coarsened to at most ``max_points`` boundaries), with the
    same limits as the other plans (chunks in [floor, cap], the last <= budget). Exact on the
    grid up to ``rel_tol``."""
    check_prompt(prompt_len, history, spec)
    g = _dp_grid(prompt_len, spec, grid, max_points)
    pos = np.arange(0, prompt_len, g, dtype=np.int64)
    pos = np.append(pos, prompt_len)  # [n+1] boundaries relative to history
    n = len(pos) - 1
    w = min(n, spec.max_num_batched_tokens // g + 1)
    t = np.full((n + 1, w), np.inf)  # t[j, d-1]: chunk pos[j-d] -> pos[j]
    for d in range(1, w + 1):
        j = np.arange(d, n + 1)
        size = pos[j] - pos[j - d]
        ok = np.where(j < n, (size >= spec.floor) & (size <= spec.cap),
                      size <= spec.max_num_batched_tokens)
        t[j[ok], d - 1] = model.predict_time(size[ok].astype(float),
                                             (history + pos[j - d][ok]).astype(float))

    def solve(cap_time: float, minimax: bool = False) -> tuple[float, list[int]]:
        tm = np.where(t <= cap_time, t, np.inf)
        best = np.full(n + 1, np.inf)
        best[0] = 0.0
        arg = np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            dm = min(w, j)
            prev = best[j - dm:j][::-1]
            cand = np.maximum(prev, tm[j, :dm]) if minimax else prev + tm[j, :dm]
            k = int(np.argmin(cand))
            best[j], arg[j] = cand[k], k + 1
        if not math.isfinite(best[n]):
            return math.inf, []
        chunks, j = [], n
        while j > 0:
            chunks.append(int(pos[j] - pos[j - arg[j]]))
            j -= arg[j]
        return float(best[n]), chunks[::-1]

    p1 = spec.num_stages - 1
    m_min, _ = solve(math.inf, minimax=True)
    if not math.isfinite(m_min):
        raise ValueError(f"no plan on a {g}-token grid satisfies the limits {spec}")
    evals: dict[float, tuple[float, list[int]]] = {}

    def ev(m: float) -> float:
        if m not in evals:
            evals[m] = solve(m)
        return evals[m][0]

    s_inf, plan_inf = solve(math.inf)
    m_max = float(stage_times(model, plan_inf, history).max())
    best_f, best_plan = math.inf, plan_inf

    def consider(m: float) -> None:
        nonlocal best_f, best_plan
        s, pl = evals[m]
        if pl:
            f = s + p1 * float(stage_times(model, pl, history).max())
            if f < best_f:
                best_f, best_plan = f, pl

    grid_m = sorted({m_min, m_max, *np.geomspace(m_min, max(m_max, m_min), 9).tolist()})
    for m in grid_m:
        ev(m)
        consider(m)
    heap = [(evals[b][0] + p1 * a, a, b) for a, b in zip(grid_m, grid_m[1:])]
    heapq.heapify(heap)
    while heap:
        lb, a, b = heapq.heappop(heap)
        if lb >= best_f * (1 - rel_tol) or evals[a][0] <= evals[b][0] * (1 + 1e-12):
            continue  # S constant on (a, b]: the plan at a is as cheap with a smaller max
        mid = 0.5 * (a + b)
        ev(mid)
        consider(mid)
        for lo, hi in ((a, mid), (mid, b)):
            heapq.heappush(heap, (evals[hi][0] + p1 * lo, lo, hi))
    return best_plan
