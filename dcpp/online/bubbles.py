"""Measured pipeline bubbles of one prefill, from the stages' step start/end times.

Definition (what ``dcpp_prefill_bubble_fraction`` measures)
-----------------------------------------------------------
Steps are numbered in scheduling order (every stage runs them in that order). A timed step j
has, on each pipeline stage s of P, a busy interval [a[j, s], b[j, s]]: a = when the stage
started the step's forward (after the previous stage's hand-off arrived), b = a + that stage's
measured compute (forward, plus sampling on the last stage); seconds on one clock shared by all
stages.

For one request whose prefill ran in steps F..L (its own steps J, any chunk sizes):

- window W = [t0, t1], t0 = min over j in J, s of a[j, s] (stage 0 starting its first chunk),
  t1 = max over j in J, s of b[j, s] (the last stage finishing its last chunk); |W| = t1 - t0 s;
- busy_s = |W ∩ union over every step j that ran in W (this request's or another's, prefill or
  decode) of [a[j, s], b[j, s]]| s;
- idle_s = 1 - busy_s / |W|, in [0, 1];
- bubble fraction = (1/P) · Σ_s idle_s, in [0, 1): the share of stage-time in the window that
  no stage spent computing. For one request alone it equals the simulator's
  ``1 - Σ work / (P · ttft)`` (``dcpp.chunker.simulate``) with ttft = |W|.

Gaps (untimed steps). Once calibrated, vLLM's workers time (and sync on) only 1 step in 8, so a
prefill may contain steps whose intervals are unknown. No interval is guessed: a request is
measured only when every step that can overlap its window was timed on every stage, namely

- the steps still in flight when its first prefill step was scheduled,
- every step from its first to its last prefill step (its own and other requests'),
- the steps scheduled before its last prefill step's output came back

(a step scheduled before that output, or in flight before the first, is the only kind that can
overlap W: steps that returned before F was scheduled finished first, and steps scheduled after
L's output start after t1). Any other request is counted as unmeasured: nothing is estimated.
While calibration times every step (its first steps, and whenever drift is suspected) every
prefill is measured. To measure calibrated engines too, `BubbleTracker` can ask for full timing
(every step) for 1 prefill in ``sample_every``, from before that prefill's first step until its
window is closed; the cost is a device sync per step for that while (none on CPU, where a
stage's compute is synchronous), so it is off unless asked for (0).

Pure numpy, no engine import: `stage_idle_fractions` and `bubble_fraction` are the arithmetic,
`BubbleTracker` follows steps and requests and emits a `PrefillBubble` per measured prefill.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np


def stage_idle_fractions(starts: np.ndarray, ends: np.ndarray,
                         window: tuple[float, float]) -> np.ndarray:
    """[P] share of ``window`` each stage was not running any step.

    starts, ends: [num_steps, P] seconds (step j's interval on stage s is [starts[j, s],
    ends[j, s]]; intervals may overlap, extend past the window or be empty); window: (t0, t1)
    seconds with t1 > t0."""
    a = np.asarray(starts, dtype=float)
    b = np.asarray(ends, dtype=float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"starts and ends must be [num_steps, num_stages] of one shape, got "
                         f"{a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or (b < a).any():
        raise ValueError("step intervals must be finite with end >= start")
    t0, t1 = float(window[0]), float(window[1])
    if not t1 > t0:
        raise ValueError(f"window={window!r} must have t1 > t0")
    span = t1 - t0
    idle = np.ones(a.shape[1])
    for s in range(a.shape[1]):
        lo, hi = np.clip(a[:, s], t0, t1), np.clip(b[:, s], t0, t1)
        order = np.argsort(lo, kind="stable")
        busy, cur_lo, cur_hi = 0.0, None, None
        for x, y in zip(lo[order], hi[order]):  # union of intervals
            if cur_hi is None or x > cur_hi:
                if cur_hi is not None:
                    busy += cur_hi - cur_lo
                cur_lo, cur_hi = x, y
            else:
                cur_hi = max(cur_hi, y)
        if cur_hi is not None:
            busy += cur_hi - cur_lo
        idle[s] = 1.0 - min(busy, span) / span
    return idle


def prefill_window(own_starts: np.ndarray, own_ends: np.ndarray) -> tuple[float, float]:
    """(t0, t1) of a prefill from its own steps' [num_own_steps, P] starts and ends (s)."""
    return float(np.min(own_starts)), float(np.max(own_ends))


def bubble_fraction(starts: np.ndarray, ends: np.ndarray, window: tuple[float, float]) -> float:
    """Mean over stages of `stage_idle_fractions`: the prefill's bubble fraction."""
    return float(np.mean(stage_idle_fractions(starts, ends, window)))


@dataclasses.dataclass(frozen=True)
class PrefillBubble:
    """One measured prefill."""

    request_id: str
    label: str
    """The plan it ran under (the caller's name: "off", "pipeline", "fixed", ...)."""
    fraction: float
    """Bubble fraction (module docstring), in [0, 1)."""
    stage_idle: tuple[float, ...]
    """[P] idle share of the window per stage."""
    window_s: float
    """|W| in seconds: first chunk's start on stage 0 to last chunk's end on the last stage."""
    chunks: tuple[int, ...]
    """The request's prefill chunk sizes (tokens), in order."""
    bars: tuple[tuple[int, int, float, float], ...]
    """(stage, chunk index, start, end) of the request's own steps, seconds from t0."""
    other_steps: int
    """Steps of other requests that ran in the window (counted in busy, not in ``bars``)."""


_PENDING, _MISSING = "pending", "missing"


@dataclasses.dataclass(eq=False)
class _Open:
    label: str
    lo: int
    """Oldest step that can overlap the window (the oldest in flight at the first step)."""
    steps: list[int]
    chunks: list[int]
    next_history: int
    hi: int | None = None
    """Newest step that can overlap (set when the last step's output came back)."""
    last: int | None = None
    """The request's last prefill step (set when scheduled)."""
    held: bool = False
    """Full timing is kept on for this request (sampled)."""


class BubbleTracker:
    """Follows the engine's steps in scheduling order and emits one `PrefillBubble` per
    prefill whose window is fully timed (module docstring).

    Calls, all in the engine's order: `step` for every step scheduled (timed or not), `spans`
    for a timed step's per-stage intervals, `resolved` once the timed steps up to an index have
    been collected (those without `spans` are missing), `returned` when a step's output came
    back; `forget` for aborted requests."""

    def __init__(self, *, sample_every: int = 0, max_results: int = 1024,
                 max_open: int = 1024, stale_steps: int = 4096, hold_gap: int = 8,
                 on_result: Callable[[PrefillBubble], None] | None = None) -> None:
        if sample_every < 0:
            raise ValueError(f"sample_every={sample_every} must be >= 0 (0: never force timing)")
        self.sample_every = int(sample_every)
        """Ask for full timing for 1 prefill in this many (1: every prefill; 0: never)."""
        self.max_open, self.stale_steps = int(max_open), int(stale_steps)
        self.hold_gap = int(hold_gap)
        """A sampled prefill not scheduled for this many steps stops holding full timing."""
        self.on_result = on_result
        self.results: collections.deque[PrefillBubble] = collections.deque(maxlen=max_results)
        """The latest measured prefills."""
        self.num_measured = 0
        self.num_unmeasured = 0
        """Finished (or dropped) prefills with an untimed step in their window."""
        self._steps: dict[int, object] = {}  # index -> _PENDING | _MISSING | (starts, ends)
        self._in_flight: collections.deque[int] = collections.deque()
        self._open: collections.OrderedDict[str, _Open] = collections.OrderedDict()
        self._last_index = -1
        self._countdown = 0  # new prefills to let pass before arming full timing

    # ------------------------------------------------------------------ rate
    @property
    def armed(self) -> bool:
        """The next prefill to start will be measured (full timing is asked for)."""
        n = self.sample_every
        return n > 0 and self._countdown == 0 and (n == 1 or not self._holding())

    def _holding(self) -> bool:
        return any(o.held for o in self._open.values())

    @property
    def full_timing(self) -> bool:
        """Whether every step should be timed now (armed, or a sampled prefill in progress)."""
        return self.armed or self._holding()

    # ------------------------------------------------------------------ events
    def step(self, index: int, timed: bool, prefills: Mapping[str, tuple[int, int]],
             finishing: Iterable[str] = (), labels: Mapping[str, str] | None = None) -> None:
        """Step ``index`` was scheduled; ``timed``: the workers time it; ``prefills``: request
        id -> (chunk tokens, history tokens) of its prefill requests; ``finishing``: those whose
        prefill ends with it; ``labels``: plan name of requests starting their prefill."""
        if index <= self._last_index:
            raise ValueError(f"step {index} after step {self._last_index}: steps must come in "
                             "increasing order")
        lo = self._in_flight[0] if self._in_flight else index
        self._last_index = index
        self._steps[index] = _PENDING if timed else _MISSING
        self._in_flight.append(index)
        labels = labels or {}
        for rid, (n, history) in prefills.items():
            o = self._open.get(rid)
            label = labels.get(rid) or (o.label if o is not None else "unknown")
            if o is not None and history != o.next_history:  # preempted and restarted
                self._close(rid, measured=False)
                o = None
            if o is None:
                held = self.armed and timed
                o = self._open[rid] = _Open(label, lo, [], [], history, held=held)
                if self.sample_every > 0:
                    self._countdown = self.sample_every - 1 if held else max(0, self._countdown - 1)
                while len(self._open) > self.max_open:
                    self._close(next(iter(self._open)), measured=False)
            o.steps.append(index)
            o.chunks.append(int(n))
            o.next_history = int(history) + int(n)
        for rid in finishing:
            o = self._open.get(rid)
            if o is not None:
                o.last = index
        for rid, o in list(self._open.items()):
            if index - o.steps[-1] > self.stale_steps:
                self._close(rid, measured=False)  # lost (e.g. its finish never reached us)
            elif o.held and o.last is None and index - o.steps[-1] >= self.hold_gap:
                o.held = False  # stalled (preempted, starved): stop paying for every step
        if not timed:
            self._settle()

    def spans(self, index: int, starts: Sequence[float], ends: Sequence[float]) -> None:
        """Timed step ``index`` ran on stage s from starts[s] to ends[s] (s)."""
        if self._steps.get(index) is _PENDING:
            self._steps[index] = (np.asarray(starts, dtype=float), np.asarray(ends, dtype=float))

    def resolved(self, upto: int) -> None:
        """The timed steps up to ``upto`` were collected (in order): any still without spans
        is missing."""
        for i, state in self._steps.items():
            if i <= upto and state is _PENDING:
                self._steps[i] = _MISSING
        self._settle()

    def returned(self, index: int) -> None:
        """Step ``index``'s output came back: windows whose last step it is close."""
        while self._in_flight and self._in_flight[0] <= index:
            self._in_flight.popleft()
        for o in self._open.values():
            if o.last == index and o.hi is None:
                o.hi = self._last_index
        self._settle()

    def forget(self, request_ids: Iterable[str] | None) -> None:
        """The engine freed these requests (None: every request). A window whose last prefill
        step was scheduled still closes when that step's output comes back (a request freed
        right after its prefill is measured); one whose prefill was cut short (aborted or
        stopped) is dropped, unmeasured."""
        ids = list(self._open) if request_ids is None else list(request_ids)
        closed = False
        for rid in ids:
            if rid in self._open and self._open[rid].last is None:
                self._close(rid, measured=False)
                closed = True
        if closed:  # every freed request comes here: settle only when a window went
            self._settle()

    def reset(self) -> None:
        """Timing went off: nothing open can be measured any more."""
        for rid in list(self._open):
            self._close(rid, measured=False)
        self._steps.clear()
        self._in_flight.clear()

    # ------------------------------------------------------------------ internals
    def _close(self, rid: str, measured: bool) -> None:
        o = self._open.pop(rid, None)
        if not measured:
            self.num_unmeasured += 1
            if o is not None and o.held:
                self._countdown = 0  # the sampled prefill was lost: sample the next one

    def _settle(self) -> None:
        """Measure (or give up on) every closed window whose steps are all collected; drop
        step records no window needs."""
        for rid, o in list(self._open.items()):
            if o.hi is None:
                continue
            states = [self._steps.get(i, _MISSING) for i in range(o.lo, o.hi + 1)]
            if any(s is _PENDING for s in states):
                continue
            if any(s is _MISSING for s in states):
                self._close(rid, measured=False)
                continue
            result = self._measure(rid, o, states)
            self._close(rid, measured=result is not None)
            if result is not None:
                self.num_measured += 1
                self.results.append(result)
                if self.on_result is not None:
                    self.on_result(result)
        keep = min([o.lo for o in self._open.values()]
                   + ([self._in_flight[0]] if self._in_flight else [self._last_index + 1]))
        for i in [i for i in self._steps if i < keep]:
            del self._steps[i]

    def _measure(self, rid: str, o: _Open, states: list) -> PrefillBubble | None:
        starts = np.stack([s[0] for s in states])  # [steps, P]
        ends = np.stack([s[1] for s in states])
        own = np.array([i - o.lo for i in o.steps])
        t0, t1 = prefill_window(starts[own], ends[own])
        if not (t1 > t0) or (ends < starts).any():
            return None  # clocks not comparable across stages (should not happen on one host)
        idle = stage_idle_fractions(starts, ends, (t0, t1))
        bars = tuple((s, k, float(starts[j, s] - t0), float(ends[j, s] - t0))
                     for k, j in enumerate(own) for s in range(starts.shape[1]))
        mine = set(own.tolist())
        others = sum(1 for j in range(len(states)) if j not in mine
                     and (starts[j] < t1).any() and (ends[j] > t0).any())
        return PrefillBubble(rid, o.label, float(np.mean(idle)), tuple(float(x) for x in idle),
                             t1 - t0, tuple(o.chunks), bars, others)


def summarize(results: Iterable[PrefillBubble]) -> dict:
    """{label: {"count", "mean", "median", "min", "max"}} of measured bubble fractions."""
    by: dict[str, list[float]] = {}
    for r in results:
        by.setdefault(r.label, []).append(r.fraction)
    return {k: {"count": len(v), "mean": float(np.mean(v)), "median": float(np.median(v)),
                "min": float(np.min(v)), "max": float(np.max(v))} for k, v in sorted(by.items())}
