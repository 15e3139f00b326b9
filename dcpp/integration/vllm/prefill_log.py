"""`PrefillLog`: what each prefill ran, for logs and for the whole-prefill measurement.

It records the chunk sizes every prefill executed and, for planned requests while calibration
runs, when the prefill started and whether it ran alone in every step. A finished prefill that
ran alone in four chunks or more is a measurement of the per-step cost that the planner charges
for every extra chunk (turnaround, hand-offs, jitter), which per-step compute timings cannot see.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

from dcpp.integration.vllm.chunk_sizer import trim_log

MIN_MEASURED_CHUNKS = 4
"""A whole prefill of fewer chunks says too little about the per-chunk cost."""


@dataclasses.dataclass
class _Started:
    started_at: float
    """Monotonic seconds of the step that scheduled its first chunk."""
    history: int
    """Tokens already computed (prefix-cache hits) when it started."""
    measured: bool
    """Planned by dcpp (a fixed or static prefill says nothing about the planner's cost)."""
    alone: bool = True
    """Ran alone in every step so far (a shared step's time is not its own)."""


@dataclasses.dataclass(frozen=True)
class WholePrefill:
    chunks: list[int]
    history: int
    elapsed_s: float


class PrefillLog:
    def __init__(self) -> None:
        self.chunks: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        """Executed prefill chunk sizes per request (most recent requests)."""
        self._timed: collections.OrderedDict[str, _Started] = collections.OrderedDict()

    def __contains__(self, request_id: str) -> bool:
        """Whether `request_id`'s prefill is being timed."""
        return request_id in self._timed

    def timed(self) -> list[str]:
        return list(self._timed)

    def ran(self, request_id: str, tokens: int) -> None:
        self.chunks.setdefault(request_id, []).append(int(tokens))
        trim_log(self.chunks)

    def start(self, request_id: str, now: float, history: int, measured: bool) -> None:
        """Time `request_id`'s prefill from `now` (a no-op if it is timed already)."""
        if request_id not in self._timed:
            self._timed[request_id] = _Started(now, int(history), measured)
            trim_log(self._timed)

    def start_unmeasured(self, now: float) -> None:
        """Prefills begun before timing started: timed, never measured."""
        for rid in self.chunks:
            self.start(rid, now, 0, measured=False)

    def shared(self, request_ids: Iterable[str]) -> None:
        """These requests ran in one step together: none of them ran alone."""
        for rid in request_ids:
            if rid in self._timed:
                self._timed[rid].alone = False

    def finish(self, request_ids: Iterable[str], t_out: float) -> list[WholePrefill]:
        """Stop timing `request_ids`, whose last chunk's output came back at `t_out`; the ones
        that measure the per-chunk cost."""
        done = []
        for rid in request_ids:
            info = self._timed.pop(rid, None)
            chunks = self.chunks.get(rid, [])
            if (info is not None and info.alone and info.measured
                    and len(chunks) >= MIN_MEASURED_CHUNKS):
                done.append(WholePrefill(list(chunks), info.history, t_out - info.started_at))
        return done

    def forget(self, request_ids: Iterable[str] | None) -> None:
        """Stop timing `request_ids` (None: every request); their chunk logs stay."""
        if request_ids is None:
            self._timed.clear()
            return
        for rid in request_ids:
            self._timed.pop(rid, None)
