"""Live calibration: the latency model fitted from real step timings instead of start-up profiling
(plain Python, no vLLM import).

Used where a model runner cannot time a prefill after a history (vLLM's V2 runner, see
`vllm_compat_worker.timed_prefill_unsupported`), or where the user sets ``live_calibration``. The
engine serves vLLM's static chunks with every step timed on every stage; `LiveFit` collects the
(batch, slowest-stage seconds) of each prefill step and fits once they cover enough (chunk,
history) points (`ReadinessRule`); the runtime then switches to dynamic chunking.

Why this rule. Static chunks are a poor design for the five-term model
t = alpha*C^2 + beta*C*H + gamma*C + delta*H + c: almost every step has C = budget, so C^2, C
and 1 are collinear, and C*H is collinear with H. Only a prompt's last chunk (the remainder) and
steps shared by several requests have other chunk sizes. So the rule asks for chunk sizes
spread down to the small end (where c and gamma separate) and for histories > 0 under more
than one chunk size (where beta and delta separate), on at least 32 steps (twice the 16
passes of a start-up profile: a served step scatters more than a best-of-3 profiling pass).
Simulated on static-chunk traffic (budget 512, prompts of 600-6000 tokens, 15% / 30% noise,
three model shapes incl. a large delta): ready after a median 48 steps (at most 74); median
error over a (chunk 64-512, history 0-7680) grid 5% / 9%, at its worst point (mostly chunk 64
at history 0, an extrapolation) 11% / 21%; asking for 3 small chunk sizes instead of 2 cut the
90th percentile of that worst-point error from 59% to 40% (15% noise).

Why this fit. `HistoryLatencyModel.fit(form="full")` with the online quality gates of
`calibrator.Calibrator.refit`: the same estimator the calibrator refits with after the switch
(no change of form at its first refit), free of the causal form's beta = 2*alpha, delta = 0
(off by ~70% on prefix-heavy, MLA-like shapes in the same simulation), and ~10 ms, so a
rejected fit can simply be retried after `retry_every` more steps. form="auto" picks by
leave-one-out (0.5-1.6 s of scheduler time per try at 24-64 points) and chose the 3-term
"ascend" form, 2.4x off at the worst grid point, on some of these designs. After the switch
the calibrator keeps refitting on these steps plus the dynamic ones, whose varied chunks fix
what static ones could not determine.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

from dcpp.online.calibration.calibrator import ONLINE_MAX_MEDIAN_ERROR, ONLINE_MIN_R2

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level


@dataclasses.dataclass(frozen=True)
class ReadinessRule:
    """When the collected step timings cover enough (chunk, history) points to fit."""

    min_steps: int = 32
    """Prefill steps timed."""
    min_chunk_sizes: int = 4
    """Distinct prefill chunk sizes (tokens of one request in one step)."""
    min_small_chunk_sizes: int = 3
    """Of those, sizes at most half the largest (separate c, gamma and alpha)."""
    smallest_share: float = 0.25
    """The smallest chunk is at most this share of the largest (no extrapolation to small
    chunks, the ones dynamic chunking adds)."""
    min_history_steps: int = 8
    """Prefill chunks after a history > 0."""
    min_histories: int = 4
    """Distinct histories > 0 among them."""
    min_history_chunk_sizes: int = 2
    """Distinct chunk sizes among them (separate beta from delta)."""


ONLINE_GATES = {"max_median_rel_error": ONLINE_MAX_MEDIAN_ERROR, "min_r2": ONLINE_MIN_R2}
"""The quality gates of the calibrator's online refit."""


class LiveFit:
    """Collects prefill steps' (batch, seconds) and fits the latency model once they suffice."""

    def __init__(self, *, window: int = 256, rule: ReadinessRule = ReadinessRule(),
                 retry_every: int = 8) -> None:
        self.rule = rule
        self.retry_every = max(1, int(retry_every))
        self.samples: collections.deque[tuple[list, float]] = collections.deque(
            maxlen=max(int(window), rule.min_steps))
        """Recent prefill steps: (batch of (chunk, history), slowest stage's seconds)."""
        self.num_steps = 0
        """Prefill steps observed (also those the window dropped)."""
        self.num_fits = 0
        """Fits tried (the rejected ones included)."""
        self.last_error: str | None = None
        """Why the latest fit was rejected (None: none rejected)."""
        self._next_try = 0

    def add(self, batch: list, seconds: float) -> None:
        """One prefill step: its (chunk, history) per request, its slowest stage's seconds."""
        if seconds > 0 and batch:
            self.samples.append(([(int(c), int(h)) for c, h in batch], float(seconds)))
            self.num_steps += 1

    def missing(self) -> str | None:
        """What the samples still lack for a fit (None: ready)."""
        r = self.rule
        chunks = sorted({c for batch, _ in self.samples for c, _ in batch if c > 1})
        after = [(c, h) for batch, _ in self.samples for c, h in batch if c > 1 and h > 0]
        lacks = []
        if len(self.samples) < r.min_steps:
            lacks.append(f"{len(self.samples)}/{r.min_steps} prefill steps")
        if len(chunks) < r.min_chunk_sizes:
            lacks.append(f"{len(chunks)}/{r.min_chunk_sizes} distinct chunk sizes")
        largest = chunks[-1] if chunks else 0
        small = sum(c <= largest / 2 for c in chunks)
        if small < r.min_small_chunk_sizes:
            lacks.append(f"{small}/{r.min_small_chunk_sizes} chunk sizes <= half the largest "
                         f"({largest})")
        if chunks and chunks[0] > r.smallest_share * largest:
            lacks.append(f"a chunk <= {r.smallest_share:g} x the largest (smallest {chunks[0]})")
        if len(after) < r.min_history_steps:
            lacks.append(f"{len(after)}/{r.min_history_steps} chunks after a history > 0")
        histories = len({h for _, h in after})
        if histories < r.min_histories:
            lacks.append(f"{histories}/{r.min_histories} distinct histories > 0")
        sizes = len({c for c, _ in after})
        if sizes < r.min_history_chunk_sizes:
            lacks.append(f"{sizes}/{r.min_history_chunk_sizes} chunk sizes after a history > 0")
        return ", ".join(lacks) if lacks else None

    def ready(self) -> bool:
        return self.missing() is None

    def try_fit(self) -> Any | None:
        """The fitted `HistoryLatencyModel` once ready (tried again `retry_every` steps after a
        rejected fit, which is logged at debug level), else None."""
        from dcpp.chunker.latency_model import FitError, HistoryLatencyModel

        if self.num_steps < self._next_try or len(self.samples) < self.rule.min_steps:
            return None
        lacks = self.missing()
        if lacks is not None:
            if self.num_steps % 32 == 0:
                logger.debug("dcpp: live calibration: %d prefill steps; still lacking %s",
                             self.num_steps, lacks)
            return None
        self.num_fits += 1
        try:
            model = HistoryLatencyModel.fit(list(self.samples), form="full", **ONLINE_GATES)
        except FitError as exc:
            self.last_error = str(exc)
            self._next_try = self.num_steps + self.retry_every
            logger.debug("dcpp: live calibration: fit on %d steps rejected (%s); collecting "
                         "%d more", len(self.samples), exc, self.retry_every)
            return None
        self.last_error = None
        return model

    def observe(self, batch: list, seconds: float) -> Any | None:
        """`add` then `try_fit`."""
        self.add(batch, seconds)
        return self.try_fit()

    def profile_samples(self) -> list[tuple[int, int, float]]:
        """The single-request steps as a profile's (chunk, history, seconds) points."""
        return [(b[0][0], b[0][1], s) for b, s in self.samples if len(b) == 1]
