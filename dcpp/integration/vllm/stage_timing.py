"""Per-stage step timing for the vLLM scheduler: the workers record their compute time per step
(see `worker_extension`); `StageTiming` collects those records with non-blocking RPCs and
matches them to the steps the scheduler sent, handing each matched prefill step's
(batch, slowest-stage seconds, step interval) to the caller's calibration.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable

from dcpp.integration.vllm import vllm_compat

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

#: What a matched step is handed to: (batch of (chunk, history), slowest stage's compute in s,
#: step interval in s or None when it was not measured).
StepSink = Callable[[list, float, "float | None"], None]


@dataclasses.dataclass(eq=False)
class SentStep:
    """One scheduled step awaiting its workers' timings."""

    fingerprint: int
    """`vllm_compat.step_fingerprint` of the step's SchedulerOutput (what the workers key on)."""
    batch: list[tuple[int, int]]
    """(chunk tokens, history tokens) per scheduled request."""
    has_prefill: bool
    interval: float | None = None
    """Measured step interval in seconds, filled in by the scheduler when its output comes."""


class StageTiming:
    """Collects the workers' per-step compute times without stalling the pipeline."""

    def __init__(self, vllm_config: Any, executor: Any | None) -> None:
        self.vllm_config = vllm_config
        self.executor = executor
        self.on = False
        """Whether every worker records step times (set by `enable`; off after an RPC error)."""
        self.sent: collections.deque[SentStep] = collections.deque(maxlen=4096)
        """Steps not yet asked for (the next drain RPC covers them)."""
        self.drain: tuple[Any, list[SentStep]] | None = None
        """The drain RPC in flight: (its future, the steps it covers)."""
        self.every = 1
        """Workers time 1 in `every` steps (`vllm_compat.step_is_timed`)."""
        self._workers_every = 1
        """The rate the workers were last told."""
        self.steps_seen = 0
        self.steps_timed = 0
        """Steps tracked while timing was on, and those of them the workers time."""

    def _rpc(self, name: str) -> Any:
        from dcpp.integration.vllm import WORKER_EXTENSION_CLS
        from dcpp.integration.vllm import worker_extension as ext

        if self.vllm_config.parallel_config.worker_extension_cls == WORKER_EXTENSION_CLS:
            return "dcpp_" + name
        return getattr(ext, name)

    def enable(self) -> None:
        if self.executor is None:
            return
        try:
            res = self.executor.collective_rpc(self._rpc("enable_step_timing"), timeout=60,
                                               args=(self.every,))
            self.on = bool(res) and all(isinstance(r, dict) and r.get("ok") for r in res)
        except Exception as exc:
            logger.warning("dcpp: per-stage step timing unavailable (%s: %s); calibrating on "
                           "step intervals", type(exc).__name__, exc)
            self.on = False
        if self.on:
            logger.info("dcpp: per-stage step timing on (%d workers)", len(res))

    def track(self, out: Any, batch: list[tuple[int, int]], has_prefill: bool) -> SentStep:
        """A record of the scheduled step `out`; queued for the next drain while timing is on."""
        step = SentStep(vllm_compat.step_fingerprint(out), batch, has_prefill)
        if self.on:
            self.steps_seen += 1
            if vllm_compat.step_is_timed(step.fingerprint, self._workers_every):
                self.steps_timed += 1
                self.sent.append(step)
        return step

    def poll(self, idle: bool, sink: StepSink) -> None:
        """Collect the workers' step times without stalling the pipeline: a drain RPC is
        sent non-blocking and read once vLLM has resolved it (its futures resolve in order as
        the engine waits on its own steps); when the engine is idle it is read at once."""
        if self.drain is not None and (idle or vllm_compat.future_done(self.drain[0])):
            future, steps = self.drain
            self.drain = None
            try:
                self._match(future.result(), steps, sink)
            except Exception as exc:
                logger.warning("dcpp: collecting step times failed (%s: %s); per-stage "
                               "timing off", type(exc).__name__, exc)
                self.on = False
                return
        rate_changed = self.every != self._workers_every
        if self.drain is None and (rate_changed or self.sent and (idle or len(self.sent) >= 8)):
            steps = list(self.sent)
            self.sent.clear()
            # The new rate rides on the drain (no extra RPC); steps in flight may be timed at
            # the old one: the ones a rank did not time are dropped by `_match`.
            every = self.every if rate_changed else None
            try:
                future = self.executor.collective_rpc(self._rpc("drain_step_times"),
                                                      args=(every,), non_block=True)
            except Exception as exc:
                logger.warning("dcpp: step-time RPC failed (%s: %s); per-stage timing off",
                               type(exc).__name__, exc)
                self.on = False
                return
            self.drain = (future, steps)
            self._workers_every = self.every
            if idle:
                self.poll(idle=True, sink=sink)

    @staticmethod
    def _match(results: list, steps: list[SentStep], sink: StepSink) -> None:
        """Pair each sent step with one time per PP rank (in order per fingerprint) and hand
        the complete prefill steps to `sink`."""
        per_rank: dict[int, dict[int, list[float]]] = {}  # pp_rank -> fingerprint -> seconds
        for r in results:
            rank = int(r.get("pp_rank", -1))
            table = per_rank.setdefault(rank, {})
            for fp, secs in r.get("times", []):
                table.setdefault(int(fp), []).append(float(secs))
        if not per_rank:
            return
        for step in steps:
            times = []
            for table in per_rank.values():
                got = table.get(step.fingerprint)
                if got:
                    times.append(got.pop(0))
            if len(times) != len(per_rank) or not step.has_prefill:
                continue
            measured = max(times)  # the slowest stage sets the pace
            if measured <= 0:
                continue
            sink(step.batch, measured, step.interval)
