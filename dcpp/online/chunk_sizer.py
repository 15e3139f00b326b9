"""`ChunkSizer`: per-request chunk plans and the step's time budget (plain Python, no engine).

The scheduler hook asks once per request and step: "the engine offers this request `offered`
new tokens; how many should it take?" (`size`). The answer is never 0 and never more than
`offered`, so dcpp changes the size of chunks, never which requests run (vLLM's order,
priorities and admission caps stay vLLM's). The step's budget counts a chunk only once the
engine commits to it (`commit`, with the number it really scheduled; `uncommit` if it takes
the request out of the step again, e.g. a preemption). A request's plan is computed once,
when its prefill starts (or after a prefix hit / preemption moved it), and continued after a
trim without a new plan.

Several prefills in one step share a time budget: the step may take as long as the longest
planned chunk among its committed prefills (each plan's chunk for this step, at its history);
a prefill sized after others gets the largest chunk that keeps the step's predicted time
within that (closed form), but at least `min(remaining, floor, offered)` tokens, unless an
encoder input or Mamba's block alignment then cuts it shorter (`size` has the bounds).

The step's prefill room is shared by water-filling (the step policy). Each step the pending
prefills (running prefills' rest, waiting prompts; decodes are already out of the room) get
``x_i = min(n_i, L)`` tokens, the level L filling the room R: ``sum_i min(n_i, L) = R`` (no L
if all fit: everyone whole; a prefill not started yet counts only where it runs whole, see
`_Step.level`). For the step's tokens, which vLLM's budget fixes, this split
minimises the step's predicted time: the model's only term that depends on how the tokens are
split among requests is the convex ``alpha * x_i^2`` (the linear terms are paid for each token
whenever it runs), and sum_i x_i^2 under sum_i x_i = R, x_i <= n_i is least at the equal split.
It also keeps a long prefill from taking the whole step: a request needing less than L runs
whole, in this step. So a "pipeline" request takes ``min(offered, L)`` (aligned, at least the
floor) whenever the other requests' pending prefill work covers its drain: after a prefill's
last chunk leaves stage 0, the other P-1 stages still work on it for (P-1) x its stage time,
and stage 0 idles unless other work is queued, ``other >= (P-1) * t(last chunk)`` (model
seconds). Otherwise (a lone long prompt, the last of a burst, or P = 1) it follows its plan,
made once, and still takes at most L. With no other pending prefill, L is the room: the plan
alone, as before. vLLM's admission order is never changed: L only lowers a chunk. "equal_time"
and "static" requests keep their plans (vllm-ascend's rule and fixed chunks, kept as they
are for comparison).

A "pipeline" request whose plan provably starts with a budget-sized chunk (`opens_full`, which
costs about a third of making the plan) takes vLLM's chunk in the step that admits it, which
already carries vLLM's admission work, and is planned from that same start in its next step,
as if the plan had been made first: the same chunks, one step later.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Iterable, Protocol

from dcpp.config import PLAN_MODES  # noqa: F401 - the modes a request may pick, re-exported
from dcpp.online.requests import RequestPlan, RequestTable

#: With PLAN_MODES, what a request may pick: "off" leaves it to vLLM's own chunking.
PLAN_OFF = "off"


class LatencyModel(Protocol):
    c: float

    def predict_time(self, chunk: float, history: float) -> float: ...

    def solve_chunk(self, target: float, history: float) -> float: ...


class ModelSource(Protocol):
    """The one owner of the planning model (`dcpp.chunker.planning_model.PlanningModel`)."""

    @property
    def model(self) -> LatencyModel | None: ...


#: planner(mode, tokens to prefill, history) -> chunk sizes covering exactly those tokens.
Planner = Callable[[str, int, int], list]

#: opens_full(mode, tokens to prefill, history) -> whether that plan starts with the budget.
OpensFull = Callable[[str, int, int], bool]


@dataclasses.dataclass(frozen=True)
class Ask:
    """One request's question to the sizer in one step (all counts in tokens)."""

    request_id: str
    mode: str
    """The request's plan mode (`PLAN_MODES` or `PLAN_OFF`)."""
    total: int
    """Tokens the request has (prompt, plus outputs for a resumed request)."""
    history: int
    """Tokens computed before this step's chunk."""
    offered: int
    """vLLM's own number of new tokens for the request this step (>= 1)."""
    encoder_spans: tuple[tuple[int, int], ...] = ()
    """(start, length) of encoder inputs a chunk must not end inside (vLLM's
    `disable_chunked_mm_input`); empty otherwise."""
    block_align: int = 1
    """Non-final chunks end at multiples of this position (vLLM's Mamba block-aligned split);
    1: none."""
    fixed: int | None = None
    """A fixed chunk size the request asked for (`dcpp_chunk_size`): it takes min(fixed,
    offered) tokens every step, whatever the mode and model."""


#: Pending prefills of the engine: (request id, tokens left to prefill, history) each.
Pending = Callable[[], Iterable[tuple[str, int, int]]]

#: The mode that takes its water-filled share of the step under load (module docstring).
LOAD_AWARE_MODE = "pipeline"


def water_level(needs: Iterable[int], room: int) -> float:
    """The level L with ``sum_i min(n_i, L) == room`` (tokens); ``inf`` when all needs fit in
    the room together. needs: tokens each request still needs."""
    ordered = sorted(needs)
    return _level_of_sorted(((n, False) for n in ordered), len(ordered), room)


def _level_of_sorted(ascending: Iterable[tuple[int, bool]], count: int, room: float) -> float:
    """`water_level` of (tokens, optional) needs in ascending order, `count` of them required;
    reads only as far as the first need the room cannot lift to (needs below the level are
    taken whole). An optional need counts only where it runs whole beside the required needs
    still to come (each of which needs at least as much), and is left out (no share)
    otherwise."""
    left = float(room)
    for tokens, optional in ascending:
        if optional:
            if tokens * (count + 1) <= left:
                left -= tokens
        elif tokens * count > left:
            return left / count
        else:
            left -= tokens
            count -= 1
    return math.inf


@dataclasses.dataclass(frozen=True)
class _Grant:
    tokens: int
    history: int
    target_s: float | None
    """The predicted time of the request's planned chunk (sets the step's time), or None."""


class _Step:
    """One step's prefill room and time: only what the engine committed to counts."""

    __slots__ = ("room", "pending", "granted", "proposed", "_work", "_left", "_ascending")

    def __init__(self, room: int, pending: Pending | None) -> None:
        self.room = room
        """Tokens the step's prefills may take (budget minus decodes), before any grant."""
        self.pending = pending
        self.granted: dict[str, _Grant] = {}
        """Request -> what the engine committed to this step."""
        self.proposed: dict[str, float | None] = {}
        """Request -> its planned chunk's time, from `size` until `commit`."""
        self._work: tuple[float, dict[str, float]] | None = None
        self._left: dict[str, tuple[int, int]] | None = None
        """Request -> (tokens left, history) of the pending prefills, read once."""
        self._ascending: list[tuple[int, bool, str]] | None = None
        """The pending prefills' (tokens left, not started, request), ascending, made once."""

    @property
    def prefill_room(self) -> int:
        return self.room - sum(g.tokens for g in self.granted.values())

    @property
    def target_s(self) -> float | None:
        """The step's time: its longest planned chunk among the granted prefills."""
        return max((g.target_s for g in self.granted.values() if g.target_s is not None),
                   default=None)

    def batch_s(self, model: LatencyModel) -> float:
        """Predicted seconds of the granted prefills (the fixed cost counted once); 0: none."""
        if not self.granted:
            return 0.0
        return (sum(float(model.predict_time(g.tokens, g.history))
                    for g in self.granted.values()) - model.c * (len(self.granted) - 1))

    def pending_left(self) -> dict[str, tuple[int, int]]:
        """Request -> (tokens it still had to prefill when the step began, history): the
        engine's pending prefills, read once per step and only if a request asks."""
        if self._left is None:
            self._left = {}
            for rid, left, history in (self.pending() if self.pending is not None else ()):
                if left > 0:
                    self._left[rid] = (int(left), int(history))
        return self._left

    def pending_work(self, model: LatencyModel) -> tuple[float, dict[str, float]]:
        """(total, per request) predicted seconds of the engine's pending prefill work."""
        if self._work is None:
            per = {rid: float(model.predict_time(left, history))
                   for rid, (left, history) in self.pending_left().items()}
            self._work = (sum(per.values()), per)
        return self._work

    def level(self, request_id: str, need: int) -> float:
        """The water level of the room still free (`water_level`) over this request (`need`
        tokens) and the pending prefills not yet granted in this step. A prefill that has not
        started (history 0: its prefix-cache hit is unknown, and it may share the prefix a
        running prefill is computing) counts only where it runs whole (below the level); a
        share for it could recompute that prefix. The pending needs are sorted once per step;
        each ask merges its own need in (O(pending))."""
        left = self.pending_left()
        if self._ascending is None:
            self._ascending = sorted((n, h == 0, rid) for rid, (n, h) in left.items())
        others = [(n, fresh) for n, fresh, rid in self._ascending
                  if rid != request_id and rid not in self.granted]
        required = 1 + sum(1 for _, fresh in others if not fresh)
        return _level_of_sorted(heapq.merge(others, ((need, False),)), required,
                                self.prefill_room)


class ChunkSizer:
    """Plans per request and the step budget for one engine (one model, budget, floor)."""

    def __init__(self, planner: Planner, source: ModelSource, requests: RequestTable, *,
                 floor: int, align: int, num_stages: int = 1,
                 opens_full: OpensFull | None = None) -> None:
        self._planner = planner
        self._opens_full = opens_full
        self.source = source
        """The one owner of the planning model (`PlanningModel`)."""
        self.requests = requests
        """Where each request's plan lives (its `RequestState`)."""
        self.num_deferred = 0
        """Plans put off to a request's second step."""
        self.num_stages = int(num_stages)
        """Pipeline stages P; with P = 1 there is no drain and plans always apply."""
        self.num_shared = 0
        """Chunks a "pipeline" request took at its share of the step (the water level, no
        plan) because other pending work fed the pipeline."""
        self.floor = int(floor)
        """Smallest chunk dcpp sizes a non-final chunk to (min_chunk aligned, <= budget)."""
        self.align = int(align)
        self.num_plans = 0
        """Planner calls so far (one per request unless it was moved by a hit or preemption)."""
        self._step: _Step | None = None

    @property
    def model(self) -> LatencyModel | None:
        return self.source.model

    # ------------------------------------------------------------------ step
    def begin_step(self, prefill_room: int, pending: Pending | None = None) -> None:
        """A new step whose prefills may take `prefill_room` tokens (budget minus decodes);
        `pending` lists the engine's prefills still to run (called at most once, lazily)."""
        self._step = _Step(max(0, int(prefill_room)), pending)

    def end_step(self) -> None:
        self._step = None

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def size(self, ask: Ask) -> int:
        """Tokens `ask.request_id` should take this step, always in [1, offered]. `offered`
        itself with no step begun or at most one token offered or left; min(fixed, offered),
        then the boundary cuts, for a fixed chunk size (model or not); else `offered` with no
        model, and for "off". A "pipeline" request takes at most its water-filled share of the
        step (`_Step.level`), without a plan while other work feeds the pipeline. A planned
        request (also one whose plan is put off a step: vLLM's offer is its first chunk) gets
        at least min(remaining, floor, offered) before the boundary cuts (an encoder input
        that does not fit whole, Mamba's block alignment), which may end the chunk below that.
        Counts nothing until `commit`."""
        offered = ask.offered
        remaining = ask.total - ask.history
        step, model = self._step, self.model
        if step is None or offered <= 1 or remaining <= 1:
            return offered
        step.proposed[ask.request_id] = None
        if ask.fixed is not None:
            return self._respect_boundaries(ask, max(1, min(ask.fixed, offered)))
        if model is None or ask.mode == PLAN_OFF:
            return offered
        share = offered
        if ask.mode == LOAD_AWARE_MODE:
            level = step.level(ask.request_id, remaining)
            if level < min(remaining, step.prefill_room):  # others take part of the room
                share = self._aligned(max(int(level), 1))
            if self.pipeline_fed(ask, model):
                self.num_shared += 1
                want = max(min(share, offered), min(remaining, self.floor, offered), 1)
                return self._respect_boundaries(ask, want)
        plan = self._plan_for(ask)
        # A plan put off a step starts with the budget: vLLM's offer is its first chunk.
        first = plan.chunks[0] if plan is not None else offered
        want = min(first, offered, max(step.prefill_room, 1), share)
        own_s = float(model.predict_time(first, ask.history))
        step.proposed[ask.request_id] = own_s
        target = own_s if step.target_s is None else max(step.target_s, own_s)
        batch_s = step.batch_s(model)
        if batch_s:
            # Room left in the step's time: t(batch + [(x, h)]) = batch_s + t(x, h) - c.
            fit = model.solve_chunk(target - batch_s + model.c, ask.history)
            if fit < want:
                want = self._aligned(int(fit))
        want = max(want, min(remaining, self.floor, offered), 1)
        return self._respect_boundaries(ask, min(want, offered))

    def commit(self, request_id: str, history: int, tokens: int) -> None:
        """The engine scheduled `tokens` (0: none) of `request_id` this step, after `size`:
        they leave the step's room and join its time (a second commit replaces the first)."""
        step = self._step
        if step is None:
            return
        target = step.proposed.pop(request_id, None)
        if tokens <= 0:
            step.granted.pop(request_id, None)
            return
        step.granted[request_id] = _Grant(int(tokens), int(history), target)

    def uncommit(self, request_id: str) -> None:
        """The engine took `request_id` out of this step again (preempted it)."""
        if self._step is not None:
            self._step.granted.pop(request_id, None)

    def pipeline_fed(self, ask: Ask, model: LatencyModel) -> bool:
        """Whether other pending prefill work covers the drain after this request's last
        chunk at vLLM's size: ``other >= (P-1) * t(last, total - last)`` (seconds)."""
        if self.num_stages <= 1 or self._step is None:
            return False
        last = min(ask.total - ask.history, ask.offered)
        drain = (self.num_stages - 1) * float(model.predict_time(last, ask.total - last))
        total, per = self._step.pending_work(model)
        return total - per.get(ask.request_id, 0.0) >= drain

    def _aligned(self, tokens: int) -> int:
        """`tokens` down to a multiple of the alignment (kept as is below one)."""
        return tokens - tokens % self.align if tokens >= self.align else tokens

    @staticmethod
    def _respect_boundaries(ask: Ask, want: int) -> int:
        """Never end inside an encoder input (take it whole, which vLLM's offer allows, else
        cut before it), and keep Mamba block alignment for non-final chunks."""
        end = ask.history + want
        for start, length in ask.encoder_spans:
            if start < end < start + length:
                whole = start + length - ask.history
                end = start + length if whole <= ask.offered or start <= ask.history else start
        a = ask.block_align
        if a > 1 and ask.history < end < min(ask.total, ask.history + ask.offered):
            # Mamba "align" mode caches state at absolute block boundaries.
            end = end - end % a if end - end % a > ask.history else ask.history + ask.offered
        return max(1, min(end - ask.history, ask.offered))

    # ------------------------------------------------------------------ plans
    def _plan_for(self, ask: Ask) -> RequestPlan | None:
        """The request's plan at its history: continued, made now, made from where the step
        before started it (put off), or None: put off to the next step."""
        state = self.requests.record(ask.request_id)
        plan = state.plan
        if plan is not None and plan.mode == ask.mode and plan.pos == ask.history and plan.chunks:
            return plan
        start, state.deferred_from = state.deferred_from, None
        if start is not None and start < ask.history < ask.total:
            self._make_plan(ask.request_id, ask.mode, start, ask.total)
            self.advance(ask.request_id, start, ask.history - start)  # vLLM's chunk, run last step
            return state.plan  # tokens remain: the plan is not used up
        if plan is None and self._put_off(ask):
            return None
        return self._make_plan(ask.request_id, ask.mode, ask.history, ask.total)

    def _put_off(self, ask: Ask) -> bool:
        """Whether a "pipeline" request without a plan takes vLLM's chunk this step and is
        planned from here in its next one (`opens_full`)."""
        if (ask.mode != LOAD_AWARE_MODE or self._opens_full is None
                or not self._opens_full(ask.mode, ask.total - ask.history, ask.history)):
            return False
        self.requests.record(ask.request_id).deferred_from = ask.history
        self.num_deferred += 1
        return True

    def _make_plan(self, rid: str, mode: str, history: int, total: int) -> RequestPlan:
        chunks = [int(c) for c in self._planner(mode, total - history, history)]
        self.num_plans += 1
        if sum(chunks) != total - history or any(c <= 0 for c in chunks):
            raise AssertionError(f"chunker plan {chunks} does not cover tokens {history}..{total}")
        state = self.requests.record(rid)
        self.requests.planned(state, history, chunks)
        state.plan = RequestPlan(mode=mode, chunks=list(chunks), pos=history)
        return state.plan

    def advance(self, request_id: str, history: int, ran: int) -> None:
        """`ran` tokens of `request_id` were scheduled at `history`: continue its plan. A chunk
        trimmed below plan (by vLLM's budget, the step's time or a boundary) leaves its rest
        as the next chunk; a rest below the alignment joins the chunk after it."""
        state = self.requests.get(request_id)
        plan = state.plan if state is not None else None
        if plan is None or plan.pos != history or not plan.chunks:
            return
        rest = plan.chunks[0] - ran
        plan.pos = history + ran
        if rest > 0:
            plan.chunks[0] = rest
            if rest < self.align and len(plan.chunks) > 1:
                small = plan.chunks.pop(0)
                plan.chunks[0] += small
        else:
            plan.chunks.pop(0)
            while rest < 0 and plan.chunks:  # took more than planned (a boundary): eat ahead
                take = min(-rest, plan.chunks[0])
                plan.chunks[0] -= take
                rest += take
                if plan.chunks[0] == 0:
                    plan.chunks.pop(0)
        if not plan.chunks:
            state.plan = None
