"""`StepLedger`: the steps the scheduler sent whose outputs have not come back.

vLLM returns step outputs in the order it scheduled them (its batch queue is FIFO), so the
ledger is a queue; each entry carries the step's fingerprint (`vllm_compat.step_fingerprint`)
and an output is matched to the oldest entry with the same fingerprint. Entries older than
the match never got an output (should not happen) and are dropped.
"""

from __future__ import annotations

import collections
import dataclasses

from dcpp.online.stage_timing import SentStep

MAX_PENDING = 64
"""Bound on steps in flight (vLLM keeps at most pipeline-depth batches in flight)."""


@dataclasses.dataclass(eq=False)
class LedgerEntry:
    fingerprint: int
    scheduled_at: float
    """Monotonic seconds when `schedule()` returned the step."""
    batch: list[tuple[int, int]]
    """(chunk tokens, history tokens) per scheduled request."""
    has_prefill: bool
    finishing: list[str]
    """Requests whose prefill ends with this step."""
    sent: SentStep
    """The step as the per-stage timing sees it (carries the measured interval)."""
    closed: list = dataclasses.field(default_factory=list)
    """Those of them that measure a whole prefill (`PrefillLog.close`), carried to the
    step's output (the engine may free the requests before it comes back)."""


class StepLedger:
    def __init__(self) -> None:
        self._queue: collections.deque[LedgerEntry] = collections.deque()
        self.last_output_t: float | None = None
        """Monotonic seconds when the last output came back."""

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, entry: LedgerEntry) -> None:
        self._queue.append(entry)
        while len(self._queue) > MAX_PENDING:
            self._queue.popleft()

    def pop(self, fingerprint: int) -> LedgerEntry | None:
        """The oldest step with `fingerprint` (None: not a step the ledger holds)."""
        for i, entry in enumerate(self._queue):
            if entry.fingerprint == fingerprint:
                for _ in range(i + 1):
                    got = self._queue.popleft()
                return got
        return None

    def returned(self, fingerprint: int, t_out: float) -> tuple[LedgerEntry | None, float | None]:
        """A step's output came back at `t_out`: its entry, and the step interval it measures.

        Only a prefill step that queued behind another in the pipeline measures the pace (the
        interval since the previous output); the first step of a burst also includes the fill
        of all stages. None where it measures nothing."""
        entry = self.pop(fingerprint)
        last, self.last_output_t = self.last_output_t, t_out
        if (entry is not None and entry.has_prefill and last is not None
                and last > entry.scheduled_at and t_out > last):
            return entry, t_out - last
        return entry, None
