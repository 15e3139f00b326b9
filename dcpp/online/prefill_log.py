"""`PrefillLog`: what each prefill ran, for logs and for the whole-prefill measurement.

It records the chunk sizes every prefill executed (on the request's record) and, for planned
requests while calibration runs, when the prefill started and whether it ran alone in every
step. A finished prefill that ran alone in four chunks or more is a measurement of the per-step
cost that the planner charges for every extra chunk (turnaround, hand-offs, jitter), which
per-step compute timings cannot see.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from dcpp.online.requests import PrefillTiming, RequestTable

MIN_MEASURED_CHUNKS = 4
"""A whole prefill of fewer chunks says too little about the per-chunk cost."""


@dataclasses.dataclass(frozen=True)
class ClosedPrefill:
    """A prefill whose last chunk was scheduled, waiting for that step's output."""

    chunks: list[int]
    history: int
    started_at: float


@dataclasses.dataclass(frozen=True)
class WholePrefill:
    chunks: list[int]
    history: int
    elapsed_s: float


class PrefillLog:
    def __init__(self, requests: RequestTable) -> None:
        self.requests = requests

    def is_timed(self, request_id: str) -> bool:
        """Whether `request_id`'s prefill is being timed."""
        state = self.requests.get(request_id)
        return state is not None and state.timing is not None

    def timed(self) -> list[str]:
        return [s.request_id for s in self.requests if s.timing is not None]

    def ran(self, request_id: str, tokens: int) -> None:
        self.requests.ran(self.requests.record(request_id), tokens)

    def start(self, request_id: str, now: float, history: int, measured: bool) -> None:
        """Time `request_id`'s prefill from `now` (a no-op if it is timed already)."""
        state = self.requests.record(request_id)
        if state.timing is None:
            state.timing = PrefillTiming(now, int(history), measured)

    def start_unmeasured(self, now: float) -> None:
        """Prefills begun before timing started: timed, never measured."""
        for state in self.requests:
            if state.chunks and state.timing is None:
                state.timing = PrefillTiming(now, 0, measured=False)

    def shared(self, request_ids: Iterable[str]) -> None:
        """These requests ran in one step together: none of them ran alone."""
        for rid in request_ids:
            state = self.requests.get(rid)
            if state is not None and state.timing is not None:
                state.timing.alone = False

    def close(self, request_ids: Iterable[str]) -> list[ClosedPrefill]:
        """The prefills of `request_ids` end with the step just scheduled: stop timing them;
        what the ones that can measure the per-chunk cost ran (their step's output, which
        `measure` takes, may come back after the engine freed the requests)."""
        closed = []
        for rid in request_ids:
            state = self.requests.get(rid)
            if state is None or state.timing is None:
                continue
            info, state.timing = state.timing, None
            if info.alone and info.measured and len(state.chunks) >= MIN_MEASURED_CHUNKS:
                closed.append(ClosedPrefill(list(state.chunks), info.history, info.started_at))
        return closed

    @staticmethod
    def measure(closed: Iterable[ClosedPrefill], t_out: float) -> list[WholePrefill]:
        """The closed prefills whose last chunk's output came back at `t_out`."""
        return [WholePrefill(c.chunks, c.history, t_out - c.started_at) for c in closed]
