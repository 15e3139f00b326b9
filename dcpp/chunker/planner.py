"""Chunk plans for one prompt under a latency model (DESIGN.md §2).

Objective: with P identical stages and chunk i taking s_i on each stage, the prefill's TTFT is
``sum(s) + (P-1)*max(s)`` (proportionate flow shop). It is invariant to scaling the model, so a
model of the whole forward (t) and of one stage (t/P) give the same plans.

* `static_plan`: fixed ``max_num_batched_tokens`` chunks (vLLM's default).
* `equal_time_plan`: vllm-ascend's / SGLang's rule, every chunk takes t(base, 0).
* `pipeline_plan`: the same per-chunk rule with the target time chosen by dcpp: for chunk
  counts K around the lower bound's best K, the smallest target giving K chunks (equal-time K
  chunks), walking while the objective improves (more chunks shrink the fill/drain term, each
  costs the fixed step cost c); a few rule passes, ~6 at 1M tokens.
* `default_plan`: the best of pipeline, equal-time and static (and, for models whose work
  depends on the chunking, a coarse DP) under the model, so never worse than equal-time.
* `optimal_plan`: TeraPipe-style DP: for a cap M on chunk time, the least ``sum(s)`` over an
  aligned token grid; the best ``S(M) + (P-1)*max`` over M, found by branch and bound.
* `lower_bound`: ``min_K L(K) + (P-1) * M(K)`` with relaxations of a K-chunk plan's summed
  and largest step time.
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


RUN_MIN = 3
"""`_Rule.sweep` takes a run of equal chunks in one step only if it is longer than this."""


class _Rule:
    """The per-chunk rule with everything precomputed (the planners run it thousands of times).

    `chunk` is the rule for one chunk; `sweep` applies it to a whole prompt in one loop with
    the same arithmetic (the planners' inner loop: a pass over a 1M-token prompt is ~1300
    chunks) and also returns the chunks' summed and largest predicted time."""

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

    def _solve(self, h: int) -> float:
        """Smoothed real chunk at history ``h``: the largest C with t(C, h) <= target (the
        stable root of a*C^2 + qb*C + qc = 0), moved towards the budget by sigma."""
        qb = self.b_ * h + self.g
        qc = self.d * h + self.c - self.target
        if qc >= 0:
            c_star = 0.0
        elif self.a > 0:
            c_star = (-2.0 * qc) / (qb + math.sqrt(qb * qb - 4.0 * self.a * qc))
        else:
            c_star = -qc / qb if qb > 0 else math.inf
        return self.base + self.sigma * (c_star - self.base) if c_star != math.inf else math.inf

    def _merge_tail(self, h: int, rem: int, c: int) -> int:
        """``rem`` (one merged last chunk) instead of ``c`` when a separate tail chunk would
        cost the pipeline more."""
        s_m, s_c, s_t = self.t(rem, h), self.t(c, h), self.t(rem - c, h + c)
        split = s_c + s_t + self.p1 * max(0.0, max(s_c, s_t) - self.target)
        merged = s_m + self.p1 * max(0.0, s_m - self.target)
        return rem if merged <= split else c

    def _free(self, h: int) -> int:
        """The rule's chunk at history ``h`` before the remaining-token, budget and
        max_model_len clips: solved, smoothed, aligned down, floored, capped."""
        c_s = self._solve(h)
        if c_s >= self.cap:
            return self.cap
        c = int(c_s)
        c -= c % self.align
        return min(max(c, self.floor), self.cap)

    def chunk(self, h: int, rem: int) -> int:
        hard = min(rem, self.base, self.max_len - h)
        if self.sigma == 0 or hard <= 0:
            return max(hard, 0)
        c = min(self._free(h), hard)
        if 0 < rem - c and rem <= hard:
            c = self._merge_tail(h, rem, c)
        return c

    def run_times(self, c: int, h: int, n: int) -> tuple[float, float]:
        """(summed, last) time of ``n`` chunks of ``c`` from history ``h``: chunk j takes
        t(c, h) + j * (beta*c + delta) * c, an arithmetic series."""
        first = self.t(c, h)
        step = (self.b_ * c + self.d) * c
        return n * first + step * (n * (n - 1) // 2), first + step * (n - 1)

    def static_terms(self, prompt_len: int, history: int) -> tuple[int, float, float]:
        """(chunks, summed time, largest time) of `static_plan`: budget-sized chunks, the last
        one shorter."""
        b = self.base
        full, rest = divmod(prompt_len, b)
        tot, mx = self.run_times(b, history, full) if full else (0.0, 0.0)
        if rest:
            last = self.t(rest, history + full * b)
            tot, mx = tot + last, max(mx, last)
        return full + (1 if rest else 0), tot, mx

    def _run_end(self, h: int, c: int, n: int) -> int:
        """The length of the run of chunks ``c`` from history ``h`` (the free chunk there),
        given an estimate ``n`` that may overshoot: checked with `_free` at the estimate's
        last chunk, bisected if the free chunk has already shrunk there (it never grows with
        the history: coefficients >= 0)."""
        if self._free(h + (n - 1) * c) == c:
            return n
        lo, hi = 1, n - 1  # the free chunk is c at run index lo - 1 and may not be at hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._free(h + (mid - 1) * c) == c:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def sweep(self, prompt_len: int, history: int,
              keep: bool = True) -> tuple[list[int], int, float, float]:
        """(plan, chunks, summed time, largest time) of the rule over the prompt; ``plan`` is
        empty unless ``keep``. The chunks of `chunk` called repeatedly (a test checks), with
        each run of equal chunks one step (a 1M-token prompt's ~1200 chunks are a few dozen
        runs) and the same arithmetic inline (the planners' inner loop)."""
        if self.sigma == 0:
            plan = self._slow_plan(prompt_len, history)
            s = [self.t(c, h) for c, h in zip(plan, _starts(plan, history))]
            return (plan if keep else []), len(plan), float(sum(s)), float(max(s))
        a, b_, g, d, c0 = self.a, self.b_, self.g, self.d, self.c
        target, base, sigma = self.target, self.base, self.sigma
        cap, floor, align, max_len = self.cap, self.floor, self.align, self.max_len
        plan: list[int] = []
        h, rem, k, tot, mx = history, prompt_len, 0, 0.0, 0.0
        g_t = c0 - target
        prev = tried = 0
        while rem > 0:
            hard = rem if rem < base else base
            if max_len - h < hard:
                hard = max_len - h
                if hard <= 0:
                    raise ValueError(f"no room for a chunk at history={h} (max_model_len={max_len})")
            # The free chunk (`_free`) inline.
            qb = b_ * h + g
            qc = d * h + g_t
            if qc >= 0:
                c_s = base - sigma * base
            elif a > 0:
                c_s = base + sigma * ((-2.0 * qc) / (qb + math.sqrt(qb * qb - 4.0 * a * qc)) - base)
            else:
                c_s = base + sigma * (-qc / qb - base) if qb > 0 else math.inf
            if c_s >= cap:
                c = cap
            else:
                c = int(c_s)
                c -= c % align
                if c < floor:
                    c = floor
                if c > cap:
                    c = cap
            if c > hard:
                c = hard
            elif c < rem and rem <= hard:
                c = self._merge_tail(h, rem, c)
            elif c == prev and c != tried and rem > base + RUN_MIN * c:
                # A run of c, looked for once, at its second chunk (most chunks differ from
                # the last): until the tail rules or max_model_len could clip a chunk, and
                # (unless c is the floor, which stays) while the solved chunk is at least
                # c_min, the smallest that still gives c, i.e. while t(c_min, h) <= target.
                tried = c
                n = min((rem - base - 1) // c, (max_len - h - c) // c) + 1
                if c > floor:
                    c_min = base - (base - c) / sigma
                    slope = b_ * c_min + d
                    if c_min > 0 and slope > 0:
                        span = (target - a * c_min * c_min - g * c_min - c0) / slope - h
                        n = min(n, int(span // c) + 1) if span >= c else 1
                if n > RUN_MIN:  # checking a run costs about as much as three chunks
                    n = self._run_end(h, c, n)
                    run_tot, last = self.run_times(c, h, n)
                    tot += run_tot
                    if last > mx:
                        mx = last
                    if keep:
                        plan.extend([c] * n)
                    k += n
                    h += n * c
                    rem -= n * c
                    continue
            prev = c
            s = a * c * c + b_ * c * h + g * c + d * h + c0
            tot += s
            if s > mx:
                mx = s
            if keep:
                plan.append(c)
            k += 1
            h += c
            rem -= c
        return plan, k, tot, mx

    def _slow_plan(self, prompt_len: int, history: int) -> list[int]:
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

    def plan(self, prompt_len: int, history: int) -> list[int]:
        return self.sweep(prompt_len, history)[0]


def _starts(plan: list[int], history: int) -> list[int]:
    """History at the start of each chunk of ``plan``."""
    out, h = [], history
    for c in plan:
        out.append(h)
        h += c
    return out


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
        self.rule = _Rule(model, spec, 0.0)
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
    k0, bound0, top0 = _bound_argmin(model, prompt_len, spec, history)
    k0 = min(max(k0, k_min), k_max)
    search.obj_rtol = obj_rtol = search_rtol(bound0)
    search.run(min(max(top0, m_lo), m_hi))  # its bound on the largest step

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
    # Never worse than the equal-time plan (one more pass; bounding it out costs as much).
    search.run(equal_time_target(model, spec))
    return search.best(p1)


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
    check_prompt(prompt_len, history, spec)
    p1 = spec.num_stages - 1
    rule = _Rule(model, spec, 0.0)
    _, work, top = rule.static_terms(prompt_len, history)
    cands = [_pipeline_search(model, prompt_len, spec, history),  # with the equal-time plan
             (static_plan(prompt_len, spec, history), work + p1 * top)]
    if spec.smooth_factor == 1 and _chunking_matters(model, prompt_len, spec, history, work):
        # Equal-time chunks are optimal for a fixed chunk count only when the work telescopes;
        # otherwise (prefix term delta, beta != 2*alpha) a coarse DP finds the better shape.
        try:
            dp = optimal_plan(model, prompt_len, spec, history, max_points=DEFAULT_DP_POINTS,
                              rel_tol=1e-3)
            cands.append((dp, plan_cost(model, dp, spec.num_stages, history)))
        except ValueError:
            pass  # no plan on the coarse grid fits the limits: the rule's plans remain
    return min(cands, key=lambda pc: (pc[1], len(pc[0])))[0]


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
    """A TTFT no plan within the limits can beat: ``min_K L(K) + (P-1) * M(K)`` where L(K)
    lower-bounds the summed stage time of any K-chunk plan (exact when the model telescopes,
    as ``--cost`` does: L(K) = work + K*c) and M(K) its largest step: at least the mean
    L(K)/K and, for K >= 2, the time of a floor-sized chunk where the second-to-last chunk
    starts at the earliest (the last two are at most budget and cap long)."""
    check_prompt(prompt_len, history, spec)
    _, work, top = _bound_curve(model, prompt_len, spec, history)
    return float(np.min(work + (spec.num_stages - 1) * top))


def _bound_argmin(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                  history: int) -> tuple[int, float, float]:
    """(K, bound, M(K)) at the count minimising `lower_bound`'s L(K) + (P-1) * M(K), by
    ternary search over the integers (both terms are convex in K), in plain Python."""
    p1 = spec.num_stages - 1
    ks, work, top = _bound_terms(model, prompt_len, spec, history)

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


def _bound_curve(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec,
                 history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([K] chunk counts, [K] L(K), [K] M(K)) over the counts the limits allow (seconds)."""
    (k_lo, k_hi), work, top = _bound_terms(model, prompt_len, spec, history)
    k = np.arange(k_lo, k_hi + 1, dtype=float)  # [K candidates]
    return k, work(k), top(k)


def _bound_terms(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, history: int):
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
