"""`StepOverhead`: what a pipeline step costs beyond the slowest stage's compute (plain Python).

Two measurements: steady step intervals minus their compute (a full pipeline of near-equal
steps), and whole prefills of planned requests that ran alone, whose measured time minus the
model's TTFT of their chunks, spread over their steps, is the cost the pipeline really adds per
step (turnaround, hand-offs, jitter). Once three such prefills are seen they decide.
"""

from __future__ import annotations

import collections
import statistics
from typing import Any

STEADY = 0.10
"""Consecutive steps whose compute differs by at most this fraction count as a steady
pipeline (only those measure the per-step overhead from intervals)."""

MIN_REQUESTS = 3
"""Whole prefills needed before they, not the intervals, give the overhead."""


class StepOverhead:
    def __init__(self, num_stages: int) -> None:
        self.num_stages = int(num_stages)
        self.intervals: collections.deque[float] = collections.deque(maxlen=64)
        """(interval - compute) of steady steps (s)."""
        self.request_gaps: collections.deque[float] = collections.deque(maxlen=32)
        """Per whole prefill: (measured - the model's TTFT of its chunks) / (steps + P - 1)."""
        self._prev_compute: float | None = None

    def observe_step(self, compute: float, interval: float | None) -> None:
        """A step's compute (s) and, when known, its output interval (s)."""
        prev, self._prev_compute = self._prev_compute, compute
        if interval is not None and prev is not None and abs(compute / prev - 1.0) <= STEADY:
            # Only in a full pipeline of equal steps is the interval compute plus overhead;
            # steps that grow carry their growth too, easily 100x the overhead.
            self.intervals.append(interval - compute)

    def observe_request(self, model: Any, chunks: list[int], history: int,
                        elapsed: float) -> None:
        """A planned request's whole prefill of `chunks` after `history` ran alone in
        `elapsed` s; `model` is the compute model in use."""
        from dcpp.chunker.planner import plan_cost

        model_s = plan_cost(model, chunks, self.num_stages, history=history)
        self.request_gaps.append((elapsed - model_s) / (len(chunks) + self.num_stages - 1))

    def seconds(self) -> float:
        """The per-step overhead (s, >= 0)."""
        if len(self.request_gaps) >= MIN_REQUESTS:
            return max(0.0, statistics.median(self.request_gaps))
        return max(0.0, statistics.median(self.intervals)) if self.intervals else 0.0
