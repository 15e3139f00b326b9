"""Pipeline simulation of one prompt's chunk plan (DESIGN.md §2).

Chunk k runs on stage p after it left stage p-1 and after stage p finished chunk k-1
(flow shop; chunk k+1 is scheduled while chunk k is in flight, as vLLM V1 does with PP).
Optionally at most ``max_in_flight`` chunks are in the pipeline at once (vLLM:
``max_concurrent_batches == P``): chunk k enters stage 0 only after chunk k - max_in_flight
left the last stage. With identical stages and no in-flight limit, TTFT equals
``sum(s) + (P-1)*max(s)``. Unequal stages: the longest monotone path through stage x chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

StageLatency = Callable[[int, int], float]  # (chunk_tokens, history_tokens) -> seconds
LatencyLike = Union[StageLatency, object]  # a callable or an object with predict_time


@dataclass(frozen=True)
class SimResult:
    """Outcome of one simulated prefill (seconds)."""

    ttft: float
    """Time until the last chunk leaves the last stage."""
    stage_busy: tuple[float, ...]
    """[P] seconds each stage spent computing."""
    bubble_fraction: float
    """1 - work / (P * ttft): the share of stage-time spent idle."""
    timeline: tuple[tuple[int, int, float, float], ...]
    """(stage, chunk_index, start, end) for every chunk on every stage."""


def _as_fn(lat: LatencyLike) -> StageLatency:
    if hasattr(lat, "predict_time"):
        return lambda c, h: float(lat.predict_time(c, h))
    if callable(lat):
        return lambda c, h: float(lat(c, h))
    raise ValueError(
        f"stage latency must be callable (chunk, history) -> seconds or have predict_time, "
        f"got {type(lat).__name__}"
    )


def stage_time_matrix(plan: Sequence[int], stage_latency: LatencyLike | Sequence[LatencyLike],
                      num_stages: int, history: int = 0) -> np.ndarray:
    """[P, K] seconds of chunk k on stage p."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} must be an int >= 1")
    if len(plan) == 0 or any(int(c) != c or c < 1 for c in plan):
        raise ValueError(f"plan must be a non-empty list of chunk sizes >= 1, got {list(plan)!r}")
    if isinstance(stage_latency, (list, tuple)):
        if len(stage_latency) != num_stages:
            raise ValueError(
                f"got {len(stage_latency)} stage latencies for num_stages={num_stages}; "
                "fix: pass one per stage, or a single one for identical stages"
            )
        fns = [_as_fn(s) for s in stage_latency]
    else:
        fns = [_as_fn(stage_latency)] * num_stages
    hist = history + np.concatenate([[0], np.cumsum(plan)[:-1]])
    s = np.array([[f(int(c), int(h)) for c, h in zip(plan, hist)] for f in fns])  # [P, K]
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"stage latencies must be finite and >= 0, got {s.tolist()}")
    return s


def simulate_times(times: np.ndarray, *, max_in_flight: int | None = None) -> SimResult:
    """Simulate a [P, K] matrix of stage times (seconds)."""
    s = np.asarray(times, dtype=float)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"times must be a non-empty [P, K] matrix, got shape {s.shape}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight={max_in_flight} must be >= 1 or None")
    p, k = s.shape
    end = np.zeros((p, k))
    timeline = []
    for j in range(k):
        for i in range(p):
            start = max(end[i - 1, j] if i else 0.0, end[i, j - 1] if j else 0.0)
            if i == 0 and max_in_flight is not None and j >= max_in_flight:
                start = max(start, end[p - 1, j - max_in_flight])
            end[i, j] = start + s[i, j]
            timeline.append((i, j, float(start), float(end[i, j])))
    ttft = float(end[p - 1, k - 1])
    busy = tuple(float(x) for x in s.sum(axis=1))
    bubble = 1.0 - sum(busy) / (p * ttft) if ttft > 0 else 0.0
    timeline.sort(key=lambda r: (r[0], r[1]))
    return SimResult(ttft, busy, bubble, tuple(timeline))


def simulate(plan: Sequence[int], stage_latency: LatencyLike | Sequence[LatencyLike],
             num_stages: int, *, history: int = 0, max_in_flight: int | None = None) -> SimResult:
    """Simulate ``plan`` (chunk sizes) through ``num_stages`` stages.

    stage_latency: one (chunk, history) -> seconds callable (or latency model) for identical
    stages, or a sequence of ``num_stages`` of them."""
    return simulate_times(stage_time_matrix(plan, stage_latency, num_stages, history),
                          max_in_flight=max_in_flight)
