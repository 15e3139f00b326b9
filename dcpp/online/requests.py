"""`RequestTable`: each request's dcpp state in one record (`RequestState`), created the first
time dcpp meets the request and freed in one place (`RequestTable.free`) when the engine frees
the request (finished, aborted). A preempted request keeps its record: its plan no longer
matches where vLLM resumes it, so it is planned again from there, and its chunk log goes on.

What a record holds: the request's chunk plan (`RequestPlan`), a plan put off to its next
step, the chunks its prefill ran, the timing of its whole prefill, and which bad options it was
warned about. Two bounded logs outlive the records for reports and tests: `chunk_log` (the
chunks each recent prefill ran) and `plan_log` (each plan dcpp made for it, as made).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Iterator

MAX_LOGGED_REQUESTS = 4096
"""Bound on the requests `chunk_log` and `plan_log` remember (oldest dropped first)."""

MAX_LIVE_REQUESTS = 1 << 16
"""Bound on live records: the engine frees every request it finishes, but a record whose
free never came (a lost event) must not grow the table without end."""


def trim_log(log: collections.OrderedDict, bound: int = MAX_LOGGED_REQUESTS) -> None:
    """Drop `log`'s oldest entries beyond `bound`."""
    while len(log) > bound:
        log.popitem(last=False)


@dataclasses.dataclass(eq=False)
class RequestPlan:
    mode: str
    chunks: list[int]
    """Planned chunk sizes still to run (chunks[0] starts at `pos`)."""
    pos: int
    """Token position where chunks[0] starts."""


@dataclasses.dataclass(eq=False)
class PrefillTiming:
    """A prefill timed from its first chunk to its last output (the whole-prefill measurement)."""

    started_at: float
    """Monotonic seconds of the step that scheduled its first chunk."""
    history: int
    """Tokens already computed (prefix-cache hits) when it started."""
    measured: bool
    """Planned by dcpp (a fixed or static prefill says nothing about the planner's cost)."""
    alone: bool = True
    """Ran alone in every step so far (a shared step's time is not its own)."""


@dataclasses.dataclass(eq=False)
class RequestState:
    """dcpp's state of one request."""

    request_id: str
    plan: RequestPlan | None = None
    """The plan being followed (None: none made, used up, or dropped)."""
    deferred_from: int | None = None
    """History where a plan put off by a step starts (`ChunkSizer._put_off`)."""
    chunks: list[int] = dataclasses.field(default_factory=list)
    """Prefill chunk sizes the engine scheduled for it, in order (also in `chunk_log`)."""
    plans: list[tuple[int, list[int]]] = dataclasses.field(default_factory=list)
    """Every plan made for it: (history it starts at, chunks as planned) (also in `plan_log`)."""
    timing: PrefillTiming | None = None
    warned: set[str] = dataclasses.field(default_factory=set)
    """Bad options already warned about (each once per request)."""


class RequestTable:
    """The live records, by request id, and the logs that outlive them."""

    def __init__(self) -> None:
        self._live: collections.OrderedDict[str, RequestState] = collections.OrderedDict()
        self.chunk_log: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        """Request id -> the chunks its prefill ran (recent requests, live or freed)."""
        self.plan_log: collections.OrderedDict[str, list[tuple[int, list[int]]]] = (
            collections.OrderedDict())
        """Request id -> every plan made for it, (start history, chunks) as made."""

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[RequestState]:
        return iter(list(self._live.values()))

    def get(self, request_id: str) -> RequestState | None:
        return self._live.get(request_id)

    def record(self, request_id: str) -> RequestState:
        """The request's record, created on first use."""
        state = self._live.get(request_id)
        if state is None:
            state = self._live[request_id] = RequestState(request_id)
            trim_log(self._live, MAX_LIVE_REQUESTS)
        return state

    def ran(self, state: RequestState, tokens: int) -> None:
        """The engine scheduled `tokens` of `state`'s prefill."""
        if not state.chunks:
            self.chunk_log[state.request_id] = state.chunks
            self.chunk_log.move_to_end(state.request_id)
            trim_log(self.chunk_log)
        state.chunks.append(int(tokens))

    def planned(self, state: RequestState, history: int, chunks: list[int]) -> None:
        """dcpp made a plan for `state` from `history`."""
        if not state.plans:
            self.plan_log[state.request_id] = state.plans
            self.plan_log.move_to_end(state.request_id)
            trim_log(self.plan_log)
        state.plans.append((int(history), list(chunks)))

    def free(self, request_ids: Iterable[str] | None) -> list[RequestState]:
        """Drop the records of `request_ids` (None: every record); the freed ones."""
        if request_ids is None:
            freed = list(self._live.values())
            self._live.clear()
            return freed
        return [s for s in (self._live.pop(rid, None) for rid in request_ids) if s is not None]
