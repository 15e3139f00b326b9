"""The per-chunk rule and the fixed plans (DESIGN.md §2): limits (`PlanSpec`), a plan's
predicted TTFT, the rule (`Rule`: solve t(C, H) = target, smooth, align, floor, merge a tiny
tail) chunk by chunk and over a whole prompt, and the static and equal-time plans."""

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
