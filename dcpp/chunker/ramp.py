"""The shape of the optimal plan where the work depends on the chunking (DESIGN.md §2), priced
for one cap on the step time in a few dozen closed-form steps.

With chunk i of c_i tokens after h_i cached ones taking
``t(c, h) = alpha*c^2 + beta*c*h + gamma*c + delta*h + c0`` (seconds), and the identity
``sum c_i*h_i = ((H0+N)^2 - H0^2 - sum c_i^2) / 2``, a plan's summed time is a constant plus
``sum_i [kappa*c_i^2 + delta*m_i + c0]``, ``kappa = alpha - beta/2``, m_i the middle of chunk
i. Per token that is ``kappa*c + (delta*m + c0)/c``: on its own, a chunk's best size at its
place is the **free size** F with ``kappa*F^2 = c0 + delta*(x + F/2)`` (x its start), which
grows along the prompt by ``delta / (2*kappa)`` tokens a chunk (``kappa <= 0``: as large as
allowed). Under a cap M on every step (the pipeline term ``(P-1)*max``), a chunk is also at
most its **tight size**, the largest with ``t(c, x) <= M``, which shrinks along the prompt.
The per-token cost being convex in c (kappa > 0), the best plan under M is pointwise the
smaller of the two, within [floor, cap] on the alignment grid: free chunks in front, tight
ones behind them.

`RampPlan` builds that plan from both ends, so that neither end pays for the other's
rounding: the free chunks once per prompt, forwards from its start (they do not depend on M);
per cap, the tight chunks backwards from the prompt's end (each the largest whose step fits M
and starts on the grid) until the free size is no larger; and the tokens left between them
(less than a chunk) spread over the free chunks next to the junction, where a token more or
less costs almost nothing (free sizes are a minimum), or over the tight ones, or given a chunk
of their own, whichever is cheapest (`junction.py`). Chunks of equal size come in runs (at
most ~(cap - floor) / align on each side), each priced in closed form (chunk j of a run takes
t(c, h) + j*(beta*c + delta)*c), so a price costs tens of steps whatever the prompt's length;
the chunk list is built only for the answer. Tokens are ints, times seconds, positions
absolute (history included).
"""

from __future__ import annotations

import math
from bisect import bisect_right

from dcpp.chunker.junction import best_junction
from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.rule import PlanSpec

Runs = list  # [(chunk_tokens, count), ...] in plan order


def free_size(model: HistoryLatencyModel, x: float) -> float:
    """The free size (tokens) of a chunk starting at x (`RampPlan.free`)."""
    kap = model.alpha - 0.5 * model.beta
    if kap <= 0:
        return math.inf
    hd = 0.5 * model.delta
    return (hd + math.sqrt(hd * hd + 4.0 * kap * (model.c + model.delta * x))) / (2.0 * kap)


class RampPlan:
    """Plans of the free-then-tight shape for one prompt, one per cap M on the step time.

    Needs limits on the grid (cap and floor multiples of the alignment; `default_plan`
    checks). ``price(M)`` -> (objective, key); ``plan(key)`` -> the chunk list. ``prices``
    counts the calls and ``steps`` the runs they walked (tests count these, not wall time)."""

    __slots__ = ("a", "b", "g", "d", "c0", "kap", "p1", "h0", "end", "budget", "cap", "floor",
                 "align", "prices", "steps", "top", "fx", "fc", "fn", "ftot", "fk")

    def __init__(self, model: HistoryLatencyModel, spec: PlanSpec, prompt_len: int,
                 history: int) -> None:
        self.a, self.b, self.g, self.d, self.c0 = (model.alpha, model.beta, model.gamma,
                                                   model.delta, model.c)
        self.kap = model.alpha - 0.5 * model.beta  # seconds / token^2 of sum c_i^2
        self.p1 = spec.num_stages - 1
        self.h0, self.end = history, history + prompt_len  # tokens (absolute)
        self.budget, self.cap, self.floor, self.align = (spec.max_num_batched_tokens, spec.cap,
                                                         spec.floor, spec.align)
        self.prices = self.steps = 0
        self.top = math.inf
        """The largest step (seconds) of the plan the last `price` chose."""
        self._free_runs()

    # --- sizes ----------------------------------------------------------------------------
    def t(self, c: float, h: float) -> float:
        return self.a * c * c + self.b * c * h + self.g * c + self.d * h + self.c0

    def free(self, x: float) -> float:
        """The free size F at start x: kappa*F^2 - delta*F/2 - (c0 + delta*x) = 0 (inf when
        kappa <= 0: the summed time falls as chunks grow)."""
        if self.kap <= 0:
            return math.inf
        hd = 0.5 * self.d
        root = math.sqrt(hd * hd + 4.0 * self.kap * (self.c0 + self.d * x))
        return (hd + root) / (2.0 * self.kap)

    def free_below(self, u: float) -> float:
        """The starts x with F(x) < u are those below this (F grows with x)."""
        if self.kap <= 0:
            return -math.inf
        if self.d <= 0:
            return math.inf if self.kap * u * u > self.c0 else -math.inf
        return (self.kap * u * u - 0.5 * self.d * u - self.c0) / self.d

    def latest_end(self, c: int, m: float) -> float:
        """The latest end of a chunk of c tokens whose step fits m: t(c, end - c) <= m."""
        slope = self.b * c + self.d
        rest = m - (self.a * c * c + self.g * c + self.c0)
        if slope <= 0:
            return math.inf if rest >= 0 else -math.inf
        return rest / slope + c

    def fit_root(self, x_end: float, m: float) -> float:
        """The largest real c such that a chunk of c tokens ending at x_end, and every smaller
        one, fits m: the first positive root of t(c, x_end - c) = m, i.e. of (alpha - beta)*c^2
        + (beta*x_end + gamma - delta)*c + (delta*x_end + c0 - m); inf if none, 0 if none
        fits."""
        qa = self.a - self.b
        qb = self.b * x_end + self.g - self.d
        qc = self.d * x_end + self.c0 - m
        if qc >= 0:
            return 0.0
        if qa == 0:
            return -qc / qb if qb > 0 else math.inf
        disc = qb * qb - 4.0 * qa * qc
        if qa < 0 and (qb <= 0 or disc < 0):
            return math.inf  # concave: does not come back above m
        if qb > 0:
            return (-2.0 * qc) / (qb + math.sqrt(disc))
        return (math.sqrt(disc) - qb) / (2.0 * qa)  # qa > 0 here; no cancellation

    # --- the free chunks, once ------------------------------------------------------------
    def _free_runs(self) -> None:
        """Runs of the free size rounded to the grid (within [floor, cap]) from the prompt's
        start while a whole chunk fits: starts ``fx``, sizes ``fc``, counts ``fn`` and the
        summed time ``ftot`` (seconds) and chunks ``fk`` before each run. Empty when
        kappa <= 0."""
        self.fx, self.fc, self.fn, self.ftot, self.fk = [], [], [], [], []
        if self.kap <= 0:
            return
        al, floor, cap, e = self.align, self.floor, self.cap, self.end
        x, tot, k, half = self.h0, 0.0, 0, 0.5 * al
        while True:
            f = self.free(x)
            c = cap if f >= cap else min(cap, max(floor, int(f / al + 0.5) * al))
            n = (e - x) // c
            if n <= 0:
                return
            if c < cap:  # while F(start) rounds to c: starts below free_below(c + al/2)
                fb = self.free_below(c + half)  # +-inf where a subnormal delta overflows
                if fb == -math.inf:
                    n = 1
                elif fb < math.inf:
                    n = min(n, max(1, math.ceil((fb - x) / c)))
            self.fx.append(x)
            self.fc.append(c)
            self.fn.append(n)
            self.ftot.append(tot)
            self.fk.append(k)
            tot += self.run_times(c, x, n)[0]
            x += n * c
            k += n

    def run_times(self, c: int, h: float, n: int) -> tuple[float, float]:
        """(summed, last) time of n chunks of c from history h (an arithmetic series)."""
        first = self.a * c * c + self.b * c * h + self.g * c + self.d * h + self.c0
        step = (self.b * c + self.d) * c
        return n * first + step * (n * (n - 1) // 2), first + step * (n - 1)

    def front(self, x_t: int) -> tuple[int, int]:
        """(run index, chunks of it) of the free chunks that fit before x_t: runs 0..i-1
        whole and j chunks of run i (i == len(fx) only when there are none)."""
        i = bisect_right(self.fx, x_t) - 1
        if i < 0:
            return 0, 0
        return i, min(self.fn[i], (x_t - self.fx[i]) // self.fc[i])

    def front_terms(self, i: int, j: int) -> tuple[float, float, int]:
        """(summed time, largest step, end) of runs 0..i-1 and j chunks of run i (free chunks
        take longer along the prompt, so the largest is the last)."""
        if j == 0:
            if i == 0:
                return 0.0, 0.0, self.h0
            i, j = i - 1, self.fn[i - 1]
        tot, last = self.run_times(self.fc[i], self.fx[i], j)
        return self.ftot[i] + tot, last, self.fx[i] + j * self.fc[i]

    # --- the tight chunks, per cap --------------------------------------------------------
    def back(self, m: float) -> tuple[Runs, int, list, list]:
        """(runs, junction, sums, lasts): the plan's last chunk and the tight chunks before
        it, in plan order, where they start (a grid point), and each run's summed and last
        step time. The last chunk (up to the budget, its start on the grid) is the smaller of
        the tight and the free size there; the others are the largest aligned chunk in
        [floor, cap] whose step fits m (the floor if none does), back to where the free size
        is no larger or a chunk no longer fits the prompt."""
        al, h0, e, floor, cap = self.align, self.h0, self.end, self.floor, self.cap
        a, b, g, d, c0, kap = self.a, self.b, self.g, self.d, self.c0, self.kap
        lim = min(self.budget, e - h0)
        want = min(self.fit_root(e, m), self.free(e - min(self.free(e), lim)), lim)
        start = e - int(want)
        start += (-(start - h0)) % al  # up to the grid: the chunk never grows past want
        if start >= e:
            start = e - 1 - (e - 1 - h0) % al
        c = e - start
        runs: Runs = [(c, 1)]
        last = a * c * c + b * c * start + g * c + d * start + c0
        sums, lasts = [last], [last]
        x_end = start
        if x_end <= h0:
            return runs, x_end, sums, lasts
        r = self.fit_root(x_end, m)
        c = cap if r >= cap else max(floor, int(r) - int(r) % al)
        while c > floor and self.t(c, x_end - c) > m:  # float rounding at the root
            c -= al
        kap_pos, hd = kap > 0, 0.5 * d
        steps = 0

        def latest_end(c: int) -> float:  # of a chunk of c tokens whose step fits m
            slope = b * c + d
            rest = m - (a * c * c + g * c + c0)
            if slope <= 0:
                return math.inf if rest >= 0 else -math.inf
            return rest / slope + c

        y_up = latest_end(c + al) if c < cap else -math.inf
        while True:
            steps += 1
            if c < cap and x_end <= y_up:  # a larger chunk fits here: grow (backwards)
                c += al
                y_up = latest_end(c + al) if c < cap else -math.inf
                continue
            n = (x_end - h0) // c  # starts stay >= h0
            if n <= 0:
                break
            if kap_pos:  # ... and the free size stays above c: starts >= free_below(c)
                num = kap * c * c - hd * c - c0  # d * free_below(c)
                fb = num / d if d > 0 else (math.inf if num > 0 else -math.inf)
                if x_end - c < fb:  # (a subnormal d may also overflow to +-inf)
                    break  # free no larger than tight: the free chunks take over
                if math.isfinite(fb):
                    k = int((x_end - fb) // c)
                    if k < n:
                        n = k
            if c < cap and y_up > -math.inf:  # ... and c + al still does not fit: ends
                # above its latest end (-inf: c + al fits nowhere, so no bound)
                k = math.ceil((x_end - y_up) / c)
                if k < n:
                    n = k if k > 1 else 1
            x_end -= n * c
            first = a * c * c + b * c * x_end + g * c + d * x_end + c0
            step = (b * c + d) * c
            runs.append((c, n))
            sums.append(n * first + step * (n * (n - 1) // 2))
            lasts.append(first + step * (n - 1))
        self.steps += steps
        runs.reverse()
        sums.reverse()
        lasts.reverse()
        return runs, x_end, sums, lasts

    # --- a plan per cap -------------------------------------------------------------------
    def price(self, m: float) -> tuple[float, tuple]:
        """(objective, key) of the plan under cap m (seconds: summed time + (P-1) * largest
        step); ``plan(key)`` rebuilds it. (inf, None) if the shape cannot meet the limits
        (e.g. floor = cap)."""
        self.prices += 1
        back, x_t, sums, lasts = self.back(m)
        i, j = self.front(x_t)
        return best_junction(self, i, j, back, x_t, sums, lasts)

    def plan(self, key: tuple) -> list[int]:
        """The chunk list of a `price` key: (i, j, mid, back) = free runs 0..i-1 whole and j
        chunks of run i, then the runs ``mid`` and ``back``; or (-1, head, (i, j), back) = that
        free prefix with its first chunks replaced by the runs ``head``, then ``back``."""
        i, j, mid, back = key
        head = None
        if i == -1:
            head, (i, j), mid = j, mid, []
        out: list[int] = []
        for k in range(min(i, len(self.fc))):
            out.extend([self.fc[k]] * self.fn[k])
        if j:
            out.extend([self.fc[i]] * j)
        if head is not None:
            new: list[int] = []
            for c, n in head:
                new.extend([c] * n)
            out[:len(new)] = new
        for c, n in mid + back:
            out.extend([c] * n)
        return out

    def price_runs(self, runs: Runs, h: float) -> tuple[float, float, float]:
        """(summed time, largest step, end) of ``runs`` started at history h."""
        tot = mx = 0.0
        for c, n in runs:
            s, last = self.run_times(c, h, n)
            tot += s
            if last > mx:
                mx = last
            h += n * c
        return tot, mx, h
