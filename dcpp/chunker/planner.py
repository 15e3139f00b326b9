"""Chunk plans for one prompt under a latency model (DESIGN.md §2).

Objective: with P identical stages and chunk i taking s_i on each stage, the prefill's TTFT is
``sum(s) + (P-1)*max(s)`` (proportionate flow shop). It is invariant to scaling the model, so a
model of the whole forward (t) and of one stage (t/P) give the same plans.

* `static_plan`: fixed ``max_num_batched_tokens`` chunks (vLLM's default).
* `equal_time_plan`: vllm-ascend's / SGLang's rule, every chunk takes t(base, 0).
* `pipeline_plan`: the same per-chunk rule with the target time chosen by dcpp: for each chunk
  count K the smallest target giving K chunks (equal-time K chunks), then the K minimising the
  objective (more chunks shrink the fill/drain term, each costs the fixed step cost c).
* `default_plan`: the best of pipeline, equal-time and static (and, for models whose work
  depends on the chunking, a coarse DP) under the model, so never worse than equal-time.
* `optimal_plan`: TeraPipe-style DP: for a cap M on chunk time, the least ``sum(s)`` over an
  aligned token grid; the best ``S(M) + (P-1)*max`` over M, found by branch and bound.
* `lower_bound`: ``min_K sum_K * (1 + (P-1)/K)`` with a relaxation of ``sum_K``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from dcpp.chunker.latency_model import HistoryLatencyModel

DEFAULT_DP_POINTS = 256
"""Grid boundaries of the coarse DP candidate in `default_plan`."""

ALIGN_MIN = 64
"""Chunks but the last are multiples of max(page_size, ALIGN_MIN) tokens."""


@dataclass(frozen=True)
class PlanSpec:
    """Engine limits and knobs every plan obeys (tokens unless noted)."""

    max_num_batched_tokens: int
    """Step budget B: no chunk is larger; the static chunk size and the equal-time base."""
    max_model_len: int
    """history + chunk never exceeds this."""
    num_stages: int = 2
    """Pipeline stages P (objective ``sum(s) + (P-1)*max(s)``)."""
    min_chunk: int = 4096
    """Floor on every chunk but the last (clamped to the budget)."""
    page_size: int = 16
    """KV page size; alignment is max(page_size, 64)."""
    smooth_factor: float = 1.0
    """sigma: chunk = B + sigma*(predicted - B); 0 reproduces static chunking."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_model_len", "num_stages", "min_chunk",
                     "page_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        s = self.smooth_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
            raise ValueError(f"smooth_factor={s!r} must be a number in [0, 1]")

    @property
    def align(self) -> int:
        return max(self.page_size, ALIGN_MIN)

    @property
    def cap(self) -> int:
        """Largest non-final chunk: the budget aligned down (the budget itself if < align)."""
        b = self.max_num_batched_tokens
        return b if b < self.align else b - b % self.align

    @property
    def floor(self) -> int:
        """Smallest non-final chunk: min_chunk aligned up, at most `cap`."""
        return min(-(-self.min_chunk // self.align) * self.align, self.cap)


def check_prompt(prompt_len: int, history: int, spec: PlanSpec) -> None:
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, (int, np.integer)) or prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len!r} must be an int >= 1 (tokens to prefill)")
    if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history < 0:
        raise ValueError(f"history={history!r} must be an int >= 0 (cached tokens)")
    if history + prompt_len > spec.max_model_len:
        raise ValueError(
            f"history + prompt_len = {history + prompt_len} exceeds max_model_len="
            f"{spec.max_model_len}; fix: raise max_model_len or shorten the prompt"
        )


# ---------------------------------------------------------------------------------------------
def plan_cost(model: HistoryLatencyModel, plan: list[int], num_stages: int, history: int = 0) -> float:
    """TTFT ``sum(s) + (P-1)*max(s)`` of ``plan`` with s from ``model`` (seconds)."""
    s = stage_times(model, plan, history)
    return float(s.sum() + (num_stages - 1) * s.max())


def stage_times(model: HistoryLatencyModel, plan: list[int], history: int = 0) -> np.ndarray:
    """[K] seconds of each chunk of ``plan`` started at ``history``."""
    c = np.asarray(plan, dtype=float)
    h = history + np.concatenate([[0.0], np.cumsum(c)[:-1]])
    return np.asarray(model.predict_time(c, h), dtype=float)


class _Rule:
    """The per-chunk rule with everything precomputed (the planners call it thousands of times)."""

    __slots__ = ("a", "b_", "g", "d", "c", "target", "base", "sigma", "cap", "floor", "align",
                 "max_len", "p1")

    def __init__(self, model: HistoryLatencyModel, spec: PlanSpec, target: float) -> None:
        self.a, self.b_, self.g, self.d, self.c = (model.alpha, model.beta, model.gamma,
                                                   model.delta, model.c)
        self.target = float(target)
        self.base, self.sigma = spec.max_num_batched_tokens, float(spec.smooth_factor)
        self.cap, self.floor, self.align = spec.cap, spec.floor, spec.align
        self.max_len, self.p1 = spec.max_model_len, spec.num_stages - 1

    def t(self, c: float, h: float) -> float:
        return self.a * c * c + self.b_ * c * h + self.g * c + self.d * h + self.c

    def chunk(self, h: int, rem: int) -> int:
        hard = min(rem, self.base, self.max_len - h)
        if self.sigma == 0 or hard <= 0:
            return max(hard, 0)
        # Largest real C with t(C, h) <= target (stable root of a*C^2 + qb*C + qc = 0).
        qb = self.b_ * h + self.g
        qc = self.d * h + self.c - self.target
        if qc >= 0:
            c_star = 0.0
        elif self.a > 0:
            c_star = (-2.0 * qc) / (qb + math.sqrt(qb * qb - 4.0 * self.a * qc))
        else:
            c_star = -qc / qb if qb > 0 else math.inf
        c_s = self.base + self.sigma * (c_star - self.base) if c_star != math.inf else math.inf
        if c_s >= self.cap:
            c = self.cap
        else:
            c = max(int(c_s) - int(c_s) % self.align, self.floor)
        c = min(c, self.cap, hard)
        tail = rem - c
        if 0 < tail and rem <= hard:
            s_m, s_c, s_t = self.t(rem, h), self.t(c, h), self.t(tail, h + c)
            split = s_c + s_t + self.p1 * max(0.0, max(s_c, s_t) - self.target)
            merged = s_m + self.p1 * max(0.0, s_m - self.target)
            if merged <= split:
                c = rem
        return c

    def plan(self, prompt_len: int, history: int) -> list[int]:
        plan: list[int] = []
        h, rem = history, prompt_len
        while rem > 0:
            c = self.chunk(h, rem)
            if c <= 0:
                raise ValueError(f"no room for a chunk at history={h} (max_model_len={self.max_len})")
            plan.append(c)
            h += c
            rem -= c
        return plan


def rule_chunk(model: HistoryLatencyModel, history: int, remaining: int, target: float,
               spec: PlanSpec) -> int:
    """One chunk by the equal-time rule with target time ``target`` (seconds): solve
    t(C, H) = target, smooth (C = B + sigma*(C - B)), floor at min_chunk, align down, clamp to
    remaining / budget / max_model_len - H; merge the tail when one merged last chunk costs the
    pipeline less than a separate tail chunk (a tiny tail would cost a whole extra step)."""
    return _Rule(model, spec, target).chunk(history, remaining)


def rule_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, target: float,
              history: int = 0) -> list[int]:
    """The rule applied chunk after chunk until the prompt is covered."""
    return _Rule(model, spec, target).plan(prompt_len, history)


def static_plan(prompt_len: int, spec: PlanSpec, history: int = 0) -> list[int]:
    """Fixed chunks of ``max_num_batched_tokens`` (the last one shorter)."""
    check_prompt(prompt_len, history, spec)
    b = spec.max_num_batched_tokens
    return [b] * (prompt_len // b) + ([prompt_len % b] if prompt_len % b else [])


def equal_time_target(model: HistoryLatencyModel, spec: PlanSpec) -> float:
    """vllm-ascend's T: the time of a base chunk at history 0 (seconds)."""
    return float(model.predict_time(spec.max_num_batched_tokens, 0))


def equal_time_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                    history: int = 0) -> list[int]:
    """Every chunk sized so t(C, H) = t(base, 0) (vllm-ascend / SGLang), then smoothed etc."""
    check_prompt(prompt_len, history, spec)
    return rule_plan(model, prompt_len, spec, equal_time_target(model, spec), history)


COARSE_TARGETS = 12
"""Target times of `pipeline_plan`'s first scan (one rule pass each)."""

BISECT_RTOL = 1e-3
"""Relative precision of the smallest target time giving k chunks (a target 0.1% above it
moves the plan's objective by far less: only the last chunk changes)."""


def pipeline_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                  history: int = 0) -> list[int]:
    """The rule's plan at the target time that minimises the pipeline objective."""
    check_prompt(prompt_len, history, spec)
    if spec.smooth_factor == 0:
        return static_plan(prompt_len, spec, history)
    p = spec.num_stages
    cache: dict[float, list[int]] = {}

    def at(m: float) -> list[int]:
        if m not in cache:
            cache[m] = rule_plan(model, prompt_len, spec, m, history)
        return cache[m]

    m_lo = float(model.predict_time(1, history))  # every chunk at its floor
    m_hi = float(model.predict_time(spec.max_num_batched_tokens, history + prompt_len))
    # At m_lo every chunk is the floor: at most this many (no pass needed to bound k).
    k_min, k_max = len(at(m_hi)), -(-prompt_len // spec.floor)
    c0 = float(model.predict_time(0, history))  # a step's time with no new tokens

    def for_k(k: int) -> list[int]:
        """Plan at the smallest target time giving <= k chunks (bisection; the bracket comes
        from targets already tried, the chunk count falls as the target grows)."""
        lo = max((m for m, pl in cache.items() if len(pl) > k), default=m_lo)
        hi = min((m for m, pl in cache.items() if len(pl) <= k), default=m_hi)
        if len(at(lo)) <= k:
            return at(lo)
        for it in range(60):
            if hi - lo <= BISECT_RTOL * hi:
                break
            mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * (lo + hi)
            k_lo, k_hi = len(at(lo)), len(at(hi))  # cached passes
            if it % 2 == 0 and k_lo > k_hi and lo > c0:
                # Regula falsi on count ~ 1 / (m - c): one probe lands near the boundary,
                # the alternating bisection keeps the bracket shrinking.
                x_lo, x_hi = 1.0 / (lo - c0), 1.0 / (hi - c0)
                x = x_hi + (x_lo - x_hi) * (k + 0.5 - k_hi) / (k_lo - k_hi)
                guess = c0 + 1.0 / x if x > 0 else mid
                if lo < guess < hi:
                    mid = guess
            if len(at(mid)) <= k:
                hi = mid
            else:
                lo = mid
        return at(hi)

    scores: dict[int, float] = {}

    def score(k: int) -> float:
        k = min(max(k, k_min), k_max)
        if k not in scores:
            scores[k] = plan_cost(model, for_k(k), p, history)
        return scores[k]

    # Coarse scan over the target time (one greedy pass each), then the exact smallest target
    # for the chunk counts around the best one, walking while the objective improves.
    for m in np.geomspace(m_lo, m_hi, COARSE_TARGETS).tolist():
        pl = at(m)
        if len(pl) not in scores:
            scores[len(pl)] = plan_cost(model, pl, p, history)
    k0 = min(scores, key=lambda k: (scores[k], k))
    scores = {}
    score(k0)
    for step in (1, -1):
        k, worse = k0, 0
        while k_min <= k + step <= k_max and worse < 2:
            k += step
            # Near the optimum the objective is flat: a step that gains < 1e-5 counts as worse.
            worse = worse + 1 if score(k) > score(k - step) * (1 - 1e-5) else 0
    best_k = min(scores, key=lambda k: (scores[k], k))
    return for_k(best_k)


def default_plan(model: HistoryLatencyModel | None, prompt_len: int, spec: PlanSpec,
                 history: int = 0, mode: str = "pipeline") -> list[int]:
    """dcpp's plan for ``mode`` ("pipeline" | "equal_time" | "static"). "pipeline" returns the
    cheapest of the pipeline, equal-time and static plans under the model."""
    if model is None or mode == "static" or spec.smooth_factor == 0:
        return static_plan(prompt_len, spec, history)
    if mode == "equal_time":
        return equal_time_plan(model, prompt_len, spec, history)
    if mode != "pipeline":
        raise ValueError(f"mode={mode!r} must be one of pipeline, equal_time, static")
    cands = [pipeline_plan(model, prompt_len, spec, history),
             equal_time_plan(model, prompt_len, spec, history),
             static_plan(prompt_len, spec, history)]
    if spec.smooth_factor == 1 and _chunking_matters(model, prompt_len, spec, history):
        # Equal-time chunks are optimal for a fixed chunk count only when the work telescopes;
        # otherwise (prefix term delta, beta != 2*alpha) a coarse DP finds the better shape.
        try:
            cands.append(optimal_plan(model, prompt_len, spec, history,
                                      max_points=DEFAULT_DP_POINTS, rel_tol=1e-3))
        except ValueError:
            pass  # no plan on the coarse grid fits the limits: the rule's plans remain
    return min(cands, key=lambda pl: (plan_cost(model, pl, spec.num_stages, history), len(pl)))


def _chunking_matters(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                      history: int) -> bool:
    """Whether the prompt's work can depend on its chunking by more than `DP_WORTH` of it:
    the non-telescoping part of the attention term, |beta - 2*alpha| * (N^2/2 + N*H), plus
    the prefix term delta * H per chunk over the most chunks the floor allows. Fitted models
    are never exactly telescoping; where this is negligible the DP cannot find a better
    shape and is skipped."""
    n, h = float(prompt_len), float(history)
    work = float(stage_times(model, static_plan(prompt_len, spec, history), history).sum())
    quad = abs(model.beta - 2.0 * model.alpha) * (n * n / 2.0 + n * h)
    prefix = model.delta * (h + n) * (-(-prompt_len // spec.floor))
    return quad + prefix > DP_WORTH * work


DP_WORTH = 1e-3
"""Smallest share of a prompt's work that chunking must be able to move for `default_plan` to
try the coarse DP (a few to tens of ms per long prompt)."""


# ---------------------------------------------------------------------------------------------
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


def lower_bound(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, history: int = 0) -> float:
    """A TTFT no plan within the limits can beat: ``min_K L(K) * (1 + (P-1)/K)`` where L(K)
    lower-bounds the summed stage time of any K-chunk plan (exact when the model telescopes,
    as ``--cost`` does: L(K) = work + K*c)."""
    check_prompt(prompt_len, history, spec)
    n, h0, m = float(prompt_len), float(history), model
    k_lo = -(-prompt_len // spec.max_num_batched_tokens)
    k_hi = max(k_lo, prompt_len // spec.floor + 1)
    k = np.arange(k_lo, k_hi + 1, dtype=float)  # [K candidates]
    # sum alpha*C^2 + beta*C*H = (alpha - beta/2)*sum C^2 + beta*((h0+n)^2 - h0^2)/2
    quad = m.beta * ((h0 + n) ** 2 - h0 ** 2) / 2
    coef = m.alpha - m.beta / 2
    sum_sq = n * n / k if coef >= 0 else np.full_like(k, n * min(n, spec.max_num_batched_tokens))
    total = quad + coef * sum_sq + m.gamma * n + m.delta * k * h0 + k * m.c
    return float(np.min(total * (1 + (spec.num_stages - 1) / k)))
