"""What the online core is told about its engine, as plain values: the limits chunk sizing
depends on, the profile it starts from, each step the engine scheduled, and the channel to the
workers' step timers. An engine adapter (`dcpp.integration.vllm`) builds these from its own
objects; nothing here imports an engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """The engine numbers chunk sizing and profiling depend on (all in tokens, but num_stages)."""

    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    """KV-cache block size."""
    num_stages: int
    """Pipeline-parallel size."""


@dataclasses.dataclass
class StartupProfile:
    """Where the latency model comes from at start-up (the profile cache, profiling, or none)."""

    model: Any | None
    """Latency model of the slowest stage; None means static chunking."""
    source: str
    """"cache", "profiled" or "none" ("live" once a live fit replaced it)."""
    path: str | None
    """Profile cache file (whether or not it exists)."""
    passes: int
    """Profiling forward passes run now (0 when loaded from the cache)."""
    samples: list = dataclasses.field(default_factory=list)
    """The profile's points as [([(chunk, history)], seconds), ...] (online refits reuse them)."""
    unsupported: str | None = None
    """Why start-up profiling cannot run on this engine's model runner (None: it can, or it
    was not tried)."""
    cache_key: dict = dataclasses.field(default_factory=dict)
    """What the profile (and the calibration saved beside it) is valid for."""


class Scheduled(NamedTuple):
    """One request of a step the engine just scheduled (a tuple: one is made per request and
    step on the scheduler's hot path)."""

    request_id: str
    tokens: int
    """Tokens scheduled for it this step."""
    history: int
    """Tokens computed before them."""
    total: int
    """Tokens the request has (prompt, plus outputs for a resumed request)."""
    plan_arg: Any = None
    """The request's own `dcpp_plan` value, unchecked (None: not given)."""
    chunk_arg: Any = None
    """The request's own `dcpp_chunk_size` value, unchecked (None: not given)."""

    @property
    def prefill(self) -> bool:
        """The step computes known tokens before the last one (a decode, draft tokens
        included, is not prefill)."""
        return self.history < self.total - 1


@dataclasses.dataclass(frozen=True)
class ScheduledStep:
    """A step the engine just scheduled."""

    fingerprint: int
    """Identifies the step on the scheduler's side and every worker's (`step_sampling`)."""
    requests: tuple[Scheduled, ...]


class WorkerChannel(Protocol):
    """The engine's RPCs into its workers' step timers (one answer per worker)."""

    def enable_step_timing(self, every: int) -> list[dict]:
        """Start timing 1 in `every` steps; each worker answers {"ok": bool, ...} (blocking)."""

    def drain_step_times(self, every: int | None) -> Any:
        """Ask for the step times recorded since the last drain (and set a new rate unless
        None), without blocking: a future whose result is one record list per worker
        ({"pp_rank": int, "times": [(fingerprint, seconds[, start])...]})."""


RPC_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, TimeoutError, EOFError)
"""What a worker RPC may raise for reasons outside dcpp (a worker died, a socket closed, a
timeout, an error raised in the worker and sent back): serving goes on without the timings."""


@dataclasses.dataclass(frozen=True)
class Offer:
    """The engine offers a request `offered` new tokens this step (the sizer's question)."""

    request_id: str
    total: int
    """Tokens the request has (prompt, plus outputs for a resumed request)."""
    history: int
    """Tokens computed before this step's chunk."""
    offered: int
    """The engine's own number of new tokens for the request this step."""
    encoder_spans: tuple[tuple[int, int], ...] = ()
    """(start, length) of encoder inputs a chunk must not end inside; empty otherwise."""
    block_align: int = 1
    """Non-final chunks end at multiples of this position; 1: none."""
    plan_arg: Any = None
    """The request's own `dcpp_plan` value, unchecked (None: not given)."""
    chunk_arg: Any = None
    """The request's own `dcpp_chunk_size` value, unchecked (None: not given)."""
