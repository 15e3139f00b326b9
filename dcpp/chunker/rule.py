"""The per-chunk rule and the fixed plans (DESIGN.md §2): limits (`PlanSpec`), a plan's
predicted TTFT, the rule (`Rule`: solve t(C, H) = target, smooth, align, floor, merge a tiny
tail) chunk by chunk and over a whole prompt, the static and equal-time plans, and the fitted
family for models whose work depends on the chunking (`TightFit`, searched by the planner)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dcpp.chunker.latency_model import HistoryLatencyModel

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
"""`Rule.sweep` takes a run of equal chunks in one step only if it is longer than this."""


class Rule:
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
                        if span < c:
                            n = 1
                        elif span < n * c:  # (a tiny slope can make span inf)
                            n = int(span // c) + 1
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
    return Rule(model, spec, target).chunk(history, remaining)


def rule_plan(model: HistoryLatencyModel, prompt_len: int, spec: PlanSpec, target: float,
              history: int = 0) -> list[int]:
    """The rule applied chunk after chunk until the prompt is covered."""
    return Rule(model, spec, target).plan(prompt_len, history)


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


# ---------------------------------------------------------------------------------------------
FIT_BAND = 2
"""Front table: a free chunk at history h is tried within this many alignment units of the
size that minimises the summed time there (`TightFit.free`)."""

FIT_TABLE_UNITS = 96
"""Front table: boundaries past this many alignment units (6144 tokens at align 64) use the
closed-form ramp instead (a longer front has enough chunks for the rounding not to matter)."""

FIT_NEAR = 0.85
"""A tight chunk is a candidate for the first tight chunk (the front ends at its start) once
it is at least this share of the free size there."""

FIT_JOIN = 1
"""A candidate start of the tight part is also tried with its first tight chunk resized by up
to this many alignment units (the front ending where it then starts)."""

FIT_EXTRA = 1
"""Tight chunks laid past the first one at least as large as the free size (each is one more
candidate; the objective only gets worse further out)."""


class TightFit:
    """Plans of the shape the DP optimum takes when a prompt's summed time depends on its
    chunking (``beta != 2*alpha`` or ``delta > 0``): free chunks in front, then tight chunks.

    The summed time of a plan is ``T0 + kappa*sum(C^2) + delta*sum(H) + K*c`` with T0 fixed and
    ``kappa = alpha - beta/2``. Two neighbouring chunks that the cap M on a step's time does
    not hold down are best ``s = delta / (2*kappa)`` tokens apart (moving a token between them
    changes the sum by ``2*kappa*(C_i - C_j) + delta``), and the size minimising the summed time
    per token at history h is ``free(h) = s/2 + sqrt(s^2/4 + (delta*h + c) / kappa)``: a ramp
    ``A + s*j``. It grows with h while the largest chunk within M shrinks, so the optimum is a
    ramp of free chunks up to where the two meet, then tight chunks (each as large as M allows),
    laid from the end backwards so that the rounding slack lands where the ramp absorbs it.
    (The DP's optima on the 64-token grid had this shape for every fitted model checked; with
    kappa <= 0, or s above the span of sizes, the ramp is "steep": floor chunks, one between,
    cap chunks.)

    ``run(m)`` is one pass over the tight part at cap m (each run of equal chunks one step,
    outside the zone near the crossing) that tries each start of the tight part in that zone
    with the best front before it: the exact band DP over short fronts (``table``: chunks
    within `FIT_BAND` units of the free size, computed once per prompt, it does not depend on
    m; also with the first tight chunk resized by up to `FIT_JOIN` units), a closed form for
    longer ones (ramp, steep or equal split), or, where the front would be shorter than the
    floor, one floor chunk with the next chunk giving way. `plan` rebuilds a candidate's
    chunks, `polish` improves a plan within a band of its boundaries. Counters: `passes`
    (tight passes) and `table_steps` (front-table and polish steps). Plans but the last chunk
    are aligned and within [floor, cap], the last one within the budget, as for every planner."""

    __slots__ = ("a", "b", "g", "d", "c", "al", "fl", "cap", "budget", "p1", "h0", "end",
                 "kappa", "s", "ramp0", "units", "tab_sum", "tab_max", "tab_arg", "tab_done",
                 "passes", "table_steps", "joins", "near", "_fixed", "_slope", "steep",
                 "window")

    def __init__(self, model: HistoryLatencyModel, spec: PlanSpec, prompt_len: int,
                 history: int) -> None:
        self.a, self.b, self.g, self.d, self.c = (model.alpha, model.beta, model.gamma,
                                                  model.delta, model.c)
        self.al, self.fl, self.cap = spec.align, spec.floor, spec.cap
        self.budget, self.p1 = spec.max_num_batched_tokens, spec.num_stages - 1
        self.h0, self.end = history, history + prompt_len
        self.kappa = self.a - 0.5 * self.b
        self.s = self.d / (2.0 * self.kappa) if self.kappa > 0 else 0.0
        self.ramp0 = min(max(self.free(history), float(self.fl)), float(self.cap))
        self.steep = self.kappa <= 0 or self.s >= self.cap - self.fl
        """The free chunks jump from the floor to the cap (no table: its band is too narrow)."""
        # Front table over alignment units u (history h0 + u*align): least summed time of a
        # front ending there, its largest step, and the previous boundary.
        self.units = min((prompt_len - 1) // self.al, FIT_TABLE_UNITS)
        self.tab_sum = [math.inf] * (self.units + 1)
        self.tab_sum[0] = 0.0
        self.tab_max = [0.0] * (self.units + 1)
        self.tab_arg = [0] * (self.units + 1)
        self.tab_done = 0
        self.passes = 0
        self.table_steps = 0
        self.joins = [o for o in range(-FIT_JOIN, FIT_JOIN + 1) if o]
        self.near = FIT_NEAR
        """Share of the free size from which a tight chunk is a candidate (`FIT_NEAR`)."""
        self._fixed = self._slope = None
        self.window = (0.0, math.inf)
        """The caps [lo, hi) that give the last `run`'s very pass (and so its result)."""

    def free(self, h: float) -> float:
        """The free chunk size at history ``h`` (inf when bigger chunks always sum to less)."""
        if self.kappa <= 0:
            return math.inf
        s = self.s
        return 0.5 * s + math.sqrt(0.25 * s * s + (self.d * h + self.c) / self.kappa)

    # --- the front ----------------------------------------------------------------------------
    def _extend(self, u_need: int) -> None:
        """Relax the front table up to unit ``u_need``: chunks within `FIT_BAND` units of the
        free size (capped), no cap on their time (the caller adds their largest step)."""
        al, h0, kap, s = self.al, self.h0, self.kappa, self.s
        fu, cu = -(-self.fl // al), self.cap // al
        if self._fixed is None:
            a, b, g, d, c0 = self.a, self.b, self.g, self.d, self.c
            # t(du*al, h) = fixed[du] + slope[du] * h
            self._fixed = [a * (x * al) ** 2 + g * x * al + c0 for x in range(cu + 1)]
            self._slope = [b * x * al + d for x in range(cu + 1)]
        fixed, slope = self._fixed, self._slope
        top = min(u_need, self.units)
        tsum, tmax, targ = self.tab_sum, self.tab_max, self.tab_arg
        dc0 = self.d * h0 + self.c
        ss = 0.25 * s * s
        u = self.tab_done
        inf = math.inf
        steps = 0
        while u <= top:
            su = tsum[u]
            if su != inf:
                h = h0 + u * al
                if kap > 0:
                    f = 0.5 * s + math.sqrt(ss + (dc0 + self.d * u * al) / kap)
                    mid = cu if f >= self.cap else int(f / al + 0.5)
                    mid = fu if mid < fu else mid
                else:
                    mid = cu
                lo = mid - FIT_BAND if mid - FIT_BAND > fu else fu
                hi = mid + FIT_BAND
                if hi > cu:
                    hi = cu
                if hi > self.units - u:
                    hi = self.units - u
                mu = tmax[u]
                for du in range(lo, hi + 1):
                    t = fixed[du] + slope[du] * h
                    v = u + du
                    if su + t < tsum[v]:
                        tsum[v], targ[v] = su + t, u
                        tmax[v] = t if t > mu else mu
                if hi >= lo:
                    steps += hi - lo + 1
            u += 1
        self.tab_done = u
        self.table_steps += steps

    def _ramp(self, length: int, j: int) -> float | None:
        """First size A of j free chunks A + s*i covering ``length`` tokens, None unless their
        grid-rounded boundaries keep every chunk within [floor, cap]."""
        s, al = self.s, self.al
        a0 = (length - 0.5 * s * j * (j - 1)) / j
        if s == 0:
            return a0 if self.fl <= a0 <= self.cap else None
        if a0 < self.fl + 0.5 * al or a0 + s * (j - 1) > self.cap - 0.5 * al:
            return None
        return a0

    def _steep(self, length: int, j: int) -> tuple[int, int] | None:
        """(floor chunks, the chunk after them) of j chunks over ``length`` tokens shaped
        floor..., x, cap... (the ramp when s is above the span of sizes, or kappa <= 0: the
        sum then prefers the extremes, small ones first)."""
        fl, cap = self.fl, self.cap
        if j * fl > length or j * cap < length:
            return None
        nf = (j * cap - length) // (cap - fl) if cap > fl else j - 1
        nf = min(nf, j - 1)
        return nf, length - nf * fl - (j - nf - 1) * cap

    def _split(self, length: int, j: int) -> tuple[int, int] | None:
        """(small chunks, their size) of ``length`` tokens in j grid chunks as equal as
        possible, the smaller ones first (the rest one alignment unit larger)."""
        al = self.al
        units = length // al
        base, extra = divmod(units, j)
        if base * al < self.fl or (base + (extra > 0)) * al > self.cap:
            return None
        return j - extra, base * al

    def _runs_cost(self, runs) -> tuple[float, float]:
        """(summed time, largest step) of runs [(size, count), ...] from h0 (closed form)."""
        a, b, g, d, c0 = self.a, self.b, self.g, self.d, self.c
        tot = mx = 0.0
        h = self.h0
        for c, n in runs:
            if n > 0:
                tot += n * (a * c * c + g * c + c0) + (b * c + d) * (n * h + c * n * (n - 1) // 2)
                hl = h + (n - 1) * c
                last = a * c * c + b * c * hl + g * c + d * hl + c0
                if last > mx:
                    mx = last
                h += n * c
        return tot, mx

    def _front_closed(self, length: int, tight_max: float) -> tuple[float, float, int]:
        """(summed time, largest step, code) of the best closed-form front over ``length``
        tokens from h0, given the tight part's largest step: code j > 0 a ramp of j chunks
        (its rounding to the grid left out), j + 10**6 j chunks as equal as the grid allows,
        j + 2*10**6 the steep shape (`_steep`)."""
        a, b, g, d, c0, s, h0, p1 = self.a, self.b, self.g, self.d, self.c, self.s, self.h0, self.p1
        best = (math.inf, 0.0, 0)

        def keep(tot: float, mx: float, code: int) -> None:
            nonlocal best
            if tot + p1 * max(mx, tight_max) < best[0] + p1 * max(best[1], tight_max):
                best = (tot, mx, code)

        e = h0 + length
        if self.steep:
            j1 = -(-length // self.cap)
            for j in (j1, j1 + 1):
                r = self._steep(length, j)
                if r is not None:
                    nf, x = r
                    keep(*self._runs_cost(((self.fl, nf), (x, 1), (self.cap, j - nf - 1))),
                         j + 2 * 10**6)
        r0 = self.ramp0
        if s > 0:
            q = r0 - 0.5 * s
            jc = (-q + math.sqrt(q * q + 2.0 * s * length)) / s
        else:
            jc = length / r0
        j1 = max(1, int(jc))
        fixed = 0.5 * b * (e * e - h0 * h0) + g * length
        for j in (j1, j1 + 1):
            a0 = self._ramp(length, j)
            if a0 is None:
                continue
            sq = j * a0 * a0 + a0 * s * j * (j - 1) + s * s * (j - 1) * j * (2 * j - 1) / 6.0
            sh = j * h0 + 0.5 * a0 * j * (j - 1) + s * (j - 1) * j * (j + 1) / 6.0
            tot = fixed + self.kappa * sq + d * sh + j * c0
            cl = a0 + s * (j - 1)
            hl = e - cl
            keep(tot, a * cl * cl + b * cl * hl + g * cl + d * hl + c0, j)
        if best[2] == 0 or r0 < self.fl + self.al:
            # No ramp fits the limits (the free size is below the floor, or the rounding):
            # chunks as equal as the grid allows, near the free size or the floor.
            je = max(-(-length // self.cap), min(length // self.fl, max(1, int(length / max(r0, self.fl) + 0.5))))
            for j in (je - 1, je, je + 1):
                if j >= 1:
                    r = self._split(length, j)
                    if r is not None:
                        ns, cs = r
                        keep(*self._runs_cost(((cs, ns), (cs + self.al, j - ns))), j + 10**6)
        return best

    def _front_plan(self, length: int, j: int) -> list[int]:
        """The closed-form front's chunks (`_front_closed`'s code j)."""
        if j > 2 * 10**6:
            j -= 2 * 10**6
            nf, x = self._steep(length, j)
            return [self.fl] * nf + [x] + [self.cap] * (j - nf - 1)
        if j > 10**6:
            j -= 10**6
            ns, cs = self._split(length, j)
            return [cs] * ns + [cs + self.al] * (j - ns)
        al, s = self.al, self.s
        a0 = self._ramp(length, j)
        out, prev, x = [], 0, 0.0
        for i in range(j):
            x += a0 + s * i
            bnd = length if i == j - 1 else int(x / al + 0.5) * al
            out.append(bnd - prev)
            prev = bnd
        return out

    # --- the tight part -----------------------------------------------------------------------
    def run(self, m: float, table: bool = False,
            keep: bool = False) -> tuple[float, tuple | None, list[int]]:
        """(objective, key, tight chunks from the end if ``keep``) of the best plan at cap m
        (inf, None if no candidate fits the limits; `window` then holds the caps giving this
        same pass). key = (end of the front, tight chunks kept, the front: 0 none, -1 the
        table's, -2 one floor chunk, else `_front_closed`'s code; size of a joint chunk
        between front and tight chunks, or 0). The objective is exact but for a ramp front
        (priced before its rounding to the grid); `plan` rebuilds the chunks."""
        self.passes += 1
        a, b, g, d, c0 = self.a, self.b, self.g, self.d, self.c
        al, fl, cap, h0, p1 = self.al, self.fl, self.cap, self.h0, self.p1
        kap, s, near = self.kappa, self.s, self.near
        zk, zs = kap / (near * near), kap * s / near
        # The front's reach (every boundary a candidate): a chunk, or with no free size below
        # the cap (the front is budget chunks) the last few.
        tail = cap if kap > 0 and self.ramp0 < cap else (FIT_EXTRA + 1) * cap
        inf = math.inf
        e = self.end
        # The last chunk: the largest C <= budget with t(C, e - C) <= m, its start on the
        # grid (the only chunk whose end may be off the grid).
        qa, qb, qc = a - b, b * e + g - d, d * e + c0 - m
        if qc >= 0:
            c_real = 0.0
        elif qa > 0:
            c_real = (-2.0 * qc) / (qb + math.sqrt(qb * qb - 4.0 * qa * qc))
        elif qa == 0:
            c_real = -qc / qb if qb > 0 else inf
        else:  # concave in C: below m up to the smaller root, and again past the larger one
            disc = qb * qb - 4.0 * qa * qc
            c_real = inf
            if qb > 0 and disc > 0:
                sq = math.sqrt(disc)
                if self.budget < (qb + sq) / (-2.0 * qa):
                    c_real = (-2.0 * qc) / (qb + sq)
        room = e - h0
        top = self.budget if self.budget < room else room
        c = top if c_real >= top else int(c_real)
        st = e - c
        off = (st - h0) % al
        if off:
            st += al - off
        if st >= e:
            st = h0 + ((room - 1) // al) * al
        c = e - st
        t = a * c * c + b * c * st + g * c + d * st + c0
        tot = mx = t
        # The caps m that give this very pass: [w_lo, w_hi) (every placed chunk fits, none of
        # the next larger sizes does; floor-forced chunks bound it from above only).
        w_lo = t if t <= m else 0.0
        w_hi = inf
        if st - al >= h0 and e - st + al <= top:
            x = e - st + al
            w_hi = a * x * x + b * x * (st - al) + g * x + d * (st - al) + c0
        e, k = st, 1
        chunks = [c] if keep else []
        if e == h0:
            self.window = (w_lo, w_hi)
            return tot + p1 * mx, (e, k, 0, 0), chunks
        best_f, best_key = inf, None
        # The tight chunks before it, from the end backwards. The greedy size never shrinks
        # going back (t falls with the history): walk it up from the previous one. Outside
        # the candidate zone, each run of one size is one step.
        prev_c, prev_t = c, t
        c -= c % al
        c = fl if c < fl else (cap if c > cap else c)
        crossed = -1
        zone = False
        mp = 0.0
        while e > h0:
            room = e - h0
            if c > room:
                c = room
                if c < fl:
                    # The front would be shorter than a floor chunk: the chunk after it gives
                    # way, the front is one floor chunk.
                    cn = e + prev_c - h0 - fl
                    if (fl <= cn <= cap) or (k == 1 and 1 <= cn <= self.budget):
                        hn = h0 + fl
                        tn = a * cn * cn + b * cn * hn + g * cn + d * hn + c0
                        t0 = a * fl * fl + b * fl * h0 + g * fl + d * h0 + c0
                        big = mp if mp > tn else tn
                        if t0 > big:
                            big = t0
                        f = tot - prev_t + tn + t0 + p1 * big
                        if f < best_f:
                            best_f, best_key = f, (hn, k - 1, -2, cn)
                    break
            h = e - c
            t = a * c * c + b * c * h + g * c + d * h + c0
            forced = t > m  # c is the floor (the walk starts at most at the greedy size)
            grow = inf  # the time of the next larger chunk, if that is what stops the walk
            if not forced:
                while c < cap:
                    x = c + al
                    if x > room:
                        break
                    hx = h - al
                    tx = a * x * x + b * x * hx + g * x + d * hx + c0
                    if tx > m:
                        grow = tx
                        break
                    c, h, t = x, hx, tx
            if not zone:
                if kap > 0:
                    zq = zk * c * c - zs * c - c0
                    zone_h = zq / d if d > 0 else (inf if zq >= 0 else -inf)
                else:
                    zone_h = -inf
                if h - h0 <= tail or h <= zone_h:
                    zone = True
                else:
                    # n chunks of c: until c + align fits (floor-forced: until c fits), and
                    # their starts outside the zone and the front's reach.
                    y = (e - h0 - tail - c) / c
                    n = -int(-y)
                    if zone_h > -inf:
                        y = (e - zone_h - c) / c
                        if y < n:
                            n = -int(-y)
                    if c < cap or forced:
                        x = c if forced else c + al
                        slope = b * x + d
                        if slope > 0:
                            y = (e - x - (m - a * x * x - g * x - c0) / slope) / c
                            if y < n:
                                n = -int(-y)
                    if n < 1:
                        n = 1
                    tot += n * (a * c * c + g * c + c0) + (b * c + d) * (n * e - c * n * (n + 1) // 2)
                    if t > mx:
                        mx = t
                    if keep:
                        chunks.extend([c] * n)
                    e -= n * c
                    k += n
                    # The window: the first chunk's time (the run's largest) must fit; the
                    # last chunk (the lowest history) grows, or stops being forced, first.
                    if forced:
                        tl = a * c * c + b * c * e + g * c + d * e + c0
                        if tl < w_hi:
                            w_hi = tl
                    else:
                        if t > w_lo:
                            w_lo = t
                        if c < cap and e - al >= h0:
                            x = c + al
                            tl = a * x * x + b * x * (e - al) + g * x + d * (e - al) + c0
                            if tl < w_hi:
                                w_hi = tl
                    mp = mx  # (the last chunk of the run is not the largest: a bound)
                    prev_c, prev_t = c, a * c * c + b * c * e + g * c + d * e + c0
                    continue
            mp = mx
            tot += t
            if t > mx:
                mx = t
            if forced:
                if t < w_hi:
                    w_hi = t
            else:
                if t > w_lo:
                    w_lo = t
                if grow < w_hi:
                    w_hi = grow
            if keep:
                chunks.append(c)
            e = h
            k += 1
            prev_c, prev_t = c, t
            length = e - h0
            if length == 0:
                f = tot + p1 * mx
                if f < best_f:
                    best_f, best_key = f, (e, k, 0, 0)
                break
            if length < fl:
                continue
            # A candidate start of the tight part, with the best front before it.
            u = length // al
            big = mx
            if table and u <= self.units:
                if u + FIT_JOIN >= self.tab_done:
                    self._extend(u + FIT_JOIN)
                tsum, tmax = self.tab_sum, self.tab_max
                fs = tsum[u]
                if fs != inf:
                    fm = tmax[u]
                    if fm > big:
                        big = fm
                    f = fs + tot + p1 * big
                    if f < best_f:
                        best_f, best_key = f, (e, k, -1, 0)
                # The joint: this tight chunk resized by a few units, the front ending where
                # it then starts.
                tp = tot - t
                for o in self.joins:
                    uu, cj = u + o, c - o * al
                    if uu < 0 or uu > self.units or cj < fl or cj > cap:
                        continue
                    fs = tsum[uu]
                    if fs == inf:
                        continue
                    hj = h0 + uu * al
                    tj = a * cj * cj + b * cj * hj + g * cj + d * hj + c0
                    big = tmax[uu]
                    if tj > big:
                        big = tj
                    if mp > big:
                        big = mp
                    f = fs + tp + tj + p1 * big
                    if f < best_f:
                        best_f, best_key = f, (hj, k - 1, -1, cj)
            else:
                fs, fm, j = self._front_closed(length, mx)
                if fm > big:
                    big = fm
                f = fs + tot + p1 * big
                if f < best_f:
                    best_f, best_key = f, (e, k, j, 0)
            if crossed < 0 and kap > 0 and kap * (c * c - s * c) >= d * e + c0:
                crossed = k
            if crossed >= 0 and k >= crossed + FIT_EXTRA:
                break
        self.window = (w_lo, w_hi)
        return best_f, best_key, chunks

    # --- the plan -------------------------------------------------------------------------------
    def polish(self, plan: list[int], radius: int = 1) -> list[int]:
        """The best plan (objective ``sum + (P-1)*max``, exactly) among those with the same
        chunk count whose boundaries lie within ``radius`` alignment units of ``plan``'s
        ((2r+1)^(K-1) plans): a DP over the boundaries keeping, at each, the (sum, max) pairs
        that no other dominates and that a lower bound on the rest does not rule out (the
        rest's least chunk times against ``plan``'s own objective). It mends the end effects
        the searches leave: a last chunk a unit off, a unit of slack in the wrong chunk.
        Counts its steps in `table_steps`."""
        a, b, g, d, c0 = self.a, self.b, self.g, self.d, self.c
        al, fl, cap, budget, h0, p1 = self.al, self.fl, self.cap, self.budget, self.h0, self.p1
        k = len(plan)
        if k < 2:
            return plan
        bnd = [h0]
        for c in plan:
            bnd.append(bnd[-1] + c)
        end = bnd[-1]
        offsets = range(-radius, radius + 1)
        # Transitions into boundary i: {(previous offset, offset): time}, and the least of them.
        trans, least = [None], [0.0]
        for i in range(1, k + 1):
            last = i == k
            ti, lo_t = {}, math.inf
            for o in ((0,) if last else offsets):
                p = end if last else bnd[i] + o * al
                for po in ((0,) if i == 1 else offsets):
                    h = bnd[i - 1] + po * al
                    c = p - h
                    if (c < 1 or c > budget) if last else (c < fl or c > cap):
                        continue
                    t = a * c * c + b * c * h + g * c + d * h + c0
                    ti[po, o] = t
                    if t < lo_t:
                        lo_t = t
            if not ti:
                return plan
            trans.append(ti)
            least.append(lo_t)
        rest = [0.0] * (k + 1)  # least summed time of the chunks after boundary i
        for i in range(k - 1, -1, -1):
            rest[i] = rest[i + 1] + least[i + 1]
        bar = self.cost(plan) * (1.0 + 1e-12)
        # layer i: {offset: [(sum, max, previous offset, index of the previous label)]}
        layers = [{0: [(0.0, 0.0, 0, 0)]}]
        steps = 0
        for i in range(1, k + 1):
            cur: dict = {}
            prev = layers[-1]
            for (po, o), t in trans[i].items():
                plabs = prev.get(po)
                if not plabs:
                    continue
                steps += len(plabs)
                out = cur.setdefault(o, [])
                for li, (sm, mx, _, _) in enumerate(plabs):
                    sm += t
                    if t > mx:
                        mx = t
                    if sm + rest[i] + p1 * mx <= bar:
                        out.append((sm, mx, po, li))
            for o, labs in list(cur.items()):
                if not labs:
                    del cur[o]
                    continue
                labs.sort()
                keep, low = [], math.inf
                for lab in labs:  # Pareto: sums ascending, maxima strictly falling
                    if lab[1] < low:
                        keep.append(lab)
                        low = lab[1]
                cur[o] = keep
            if not cur:
                return plan  # nothing in the band beats the plan itself
            layers.append(cur)
        self.table_steps += steps
        fin = layers[-1][0]
        li = min(range(len(fin)), key=lambda j: fin[j][0] + p1 * fin[j][1])
        pos, o = [end], 0
        for i in range(k, 0, -1):
            lab = layers[i][o][li]
            o, li = lab[2], lab[3]
            pos.append(bnd[i - 1] + o * al)
        pos.reverse()
        return [pos[i + 1] - pos[i] for i in range(k)]

    def count(self, key: tuple) -> int:
        """About how many chunks the candidate ``key`` has (the table front's as a ramp's)."""
        start, k, j, joint = key
        if j > 0:
            front = j % 10**6
        elif j == -2:
            front = 1
        elif j == -1:
            front = int((start - self.h0) / max(self.ramp0, self.fl)) if start > self.h0 else 0
        else:
            front = 0
        return k + front + (joint > 0)

    def cost(self, plan: list[int]) -> float:
        """``plan``'s objective (`plan_cost` without numpy)."""
        a, b, g, d, c0 = self.a, self.b, self.g, self.d, self.c
        h, tot, mx = self.h0, 0.0, 0.0
        for c in plan:
            t = a * c * c + b * c * h + g * c + d * h + c0
            tot += t
            if t > mx:
                mx = t
            h += c
        return tot + self.p1 * mx

    def plan(self, m: float, key: tuple) -> list[int]:
        """The chunks of the candidate ``key`` found by ``run(m, ...)``."""
        start, k, j, joint = key
        passes = self.passes
        _, _, chunks = self.run(m, table=j < 0, keep=True)
        self.passes = passes
        tight = chunks[:k][::-1]
        if joint:
            tight = [joint] + tight
        length = start - self.h0
        if length == 0:
            return tight
        if j > 0:
            return self._front_plan(length, j) + tight
        if j == -2:
            return [self.fl] + tight
        front, u = [], length // self.al
        while u > 0:
            p = self.tab_arg[u]
            front.append((u - p) * self.al)
            u = p
        return front[::-1] + tight
