"""Per-stage step timing: the workers record their compute time per step (in vLLM:
`dcpp.integration.vllm.worker_extension`); `StageTiming` collects those records with
non-blocking RPCs through the engine's `WorkerChannel` and matches them to the steps the
scheduler sent, handing each matched prefill step's
(batch, slowest-stage seconds, step interval) to the caller's calibration.

The workers also report when each timed step started on their stage, so every step's per-stage
interval goes to a `dcpp.online.bubbles.BubbleTracker`: each prefill whose window was fully
timed gets its measured bubble fraction (that module's docstring has the definition and how
untimed steps are handled), logged at debug level, observed in the
``dcpp_prefill_bubble_fraction`` histogram (label ``plan``) and kept for `bubble_summary`.
Calibration times every step only at first and while drift is suspected; DCPP_BUBBLE_SAMPLE_EVERY
=N (default 0: off) also measures 1 prefill in N once calibrated, by timing every step around it
(a device sync per step for that while).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable

from dcpp import envs
from dcpp.online.bubbles import BubbleTracker, PrefillBubble, summarize
from dcpp.online.engine import RPC_ERRORS, WorkerChannel

logger = logging.getLogger("vllm.dcpp")  # under "vllm": uses its log handler and level

#: What a matched step is handed to: (batch of (chunk, history), slowest stage's compute in s,
#: step interval in s or None when it was not measured).
StepSink = Callable[[list, float, "float | None"], None]

def step_is_timed(fingerprint: int, every: int) -> bool:
    """Whether workers timing 1 in `every` steps time this one (the same choice on every rank
    and in the scheduler, without any message per step)."""
    return every <= 1 or fingerprint % every == 0


@dataclasses.dataclass(eq=False)
class SentStep:
    """One scheduled step awaiting its workers' timings."""

    fingerprint: int
    """The step's fingerprint (`ScheduledStep.fingerprint`: what the workers key on)."""
    batch: list[tuple[int, int]]
    """(chunk tokens, history tokens) per scheduled request."""
    has_prefill: bool
    interval: float | None = None
    """Measured step interval in seconds, filled in by the scheduler when its output comes."""
    index: int = -1
    """Position in scheduling order among the steps tracked while timing was on (-1: none)."""


class StageTiming:
    """Collects the workers' per-step compute times without stalling the pipeline."""

    def __init__(self, channel: WorkerChannel | None, num_stages: int,
                 window: int = 256) -> None:
        self.channel = channel
        """The engine's RPCs into its workers' step timers (None: no workers to ask)."""
        self.on = False
        """Whether every worker records step times (set by `enable`; off after an RPC error)."""
        self.sent: collections.deque[SentStep] = collections.deque(maxlen=4096)
        """Steps not yet asked for (the next drain RPC covers them)."""
        self.drain: tuple[Any, list[SentStep]] | None = None
        """The drain RPC in flight: (its future, the steps it covers)."""
        self.drain_age = 0
        """Step outputs seen since the drain in flight was sent."""
        self.num_stages = max(1, int(num_stages))
        self._every = 1
        """Calibration's rate (`every` may be 1 while a prefill's bubbles are measured)."""
        self._workers_every = 1
        """The rate the workers were last told."""
        self.steps_seen = 0
        self.steps_timed = 0
        """Steps tracked while timing was on, and those of them the workers time."""
        self.bubbles = BubbleTracker(sample_every=envs.bubble_sample_every(),
                                     on_result=self._bubble_measured)
        """Measured bubbles per prefill (`dcpp.online.bubbles`)."""
        self.interval_errors: collections.deque[float] = collections.deque(maxlen=window)
        """|predicted / interval - 1| of the steps whose interval was measured beside their
        stage times (reported only: the interval carries the per-step overhead)."""
        self.metrics: Any | None = None
        """`metrics.DcppMetrics` to observe bubbles in (set by the runtime), or None."""

    @property
    def every(self) -> int:
        """Workers time 1 in `every` steps (`step_is_timed`): calibration's rate,
        or 1 while the bubble tracker wants every step."""
        return 1 if self.bubbles.full_timing else self._every

    @every.setter
    def every(self, value: int) -> None:
        self._every = max(1, int(value))

    def enable(self) -> None:
        if self.channel is None:
            return
        try:
            res = self.channel.enable_step_timing(self.every)
        except RPC_ERRORS as exc:
            logger.warning("dcpp: per-stage step timing unavailable (%s: %s); calibrating on "
                           "step intervals", type(exc).__name__, exc)
            self.on = False
            return
        self.on = bool(res) and all(isinstance(r, dict) and r.get("ok") for r in res)
        if self.on:
            logger.info("dcpp: per-stage step timing on (%d workers)", len(res))

    def track(self, fingerprint: int, batch: list[tuple[int, int]], has_prefill: bool, *,
              prefills: dict[str, tuple[int, int]] | None = None, finishing: Any = (),
              labels: dict[str, str] | None = None) -> SentStep:
        """A record of the scheduled step `fingerprint`; queued for the next drain while timing is on.
        `prefills`: request id -> (chunk, history) of the step's prefills; `finishing`: those
        whose prefill it ends; `labels`: plan names of those starting (for the bubbles)."""
        step = SentStep(fingerprint, batch, has_prefill)
        if self.on:
            self.steps_seen += 1
            step.index = self.steps_seen - 1
            timed = step_is_timed(step.fingerprint, self._workers_every)
            if timed:
                self.steps_timed += 1
                self.sent.append(step)
            self.bubbles.step(step.index, timed, prefills or {}, finishing, labels)
        return step

    def forget(self, request_ids: Any) -> None:
        """The engine freed these requests (None: all); see `BubbleTracker.forget`."""
        self.bubbles.forget(request_ids)

    def bubble_summary(self) -> dict:
        """Measured bubble fractions of recent prefills, per plan (`bubbles.summarize`)."""
        b = self.bubbles
        return {"measured": b.num_measured, "unmeasured": b.num_unmeasured,
                "sample_every": b.sample_every, "by_plan": summarize(b.results)}

    def _bubble_measured(self, r: PrefillBubble) -> None:
        logger.debug("dcpp: request %s prefill bubbles %.1f%% (plan %s, %d chunks, window "
                     "%.1f ms, stage idle %s%s)", r.request_id, 100 * r.fraction, r.label,
                     len(r.chunks), 1e3 * r.window_s,
                     "/".join(f"{100 * x:.0f}%" for x in r.stage_idle),
                     f", {r.other_steps} other steps" if r.other_steps else "")
        if self.metrics is not None:
            self.metrics.bubble_fraction.labels(plan=r.label).observe(r.fraction)

    def _off(self) -> None:
        self.on = False
        self.bubbles.reset()

    def poll(self, idle: bool, sink: StepSink, returned: SentStep | None = None) -> None:
        """Collect the workers' step times without stalling the pipeline: a drain RPC is
        sent non-blocking and read once vLLM has resolved it (its futures resolve in order as
        the engine waits on its own steps); when the engine is idle it is read at once.
        `returned`: the step whose output just came back (closes prefill windows)."""
        if returned is not None and returned.index >= 0:
            self.bubbles.returned(returned.index)
        if self.drain is not None:
            self.drain_age += 1
        # Read it once its future is done, or once the steps that were in flight when it was
        # sent (PP of them) have come back: by then the workers have answered it (vLLM's
        # multiprocessing future is done there), and the legacy Ray executor's futures
        # (`RayDistributedExecutor`) never report done at all.
        if self.drain is not None and (idle or self.drain_age >= self.num_stages
                                       or self.drain[0].done()):
            future, steps = self.drain
            self.drain = None
            try:
                results = future.result()
            except RPC_ERRORS as exc:  # the workers' answer, not what dcpp does with it
                logger.warning("dcpp: collecting step times failed (%s: %s); per-stage "
                               "timing off", type(exc).__name__, exc)
                self._off()
                return
            self._match(results, steps, sink)
        rate_changed = self.every != self._workers_every
        if self.drain is None and (rate_changed or self.sent and (idle or len(self.sent) >= 8)):
            steps = list(self.sent)
            self.sent.clear()
            # The new rate rides on the drain (no extra RPC); steps in flight may be timed at
            # the old one: the ones a rank did not time are dropped by `_match`.
            every = self.every if rate_changed else None
            try:
                future = self.channel.drain_step_times(every)
            except RPC_ERRORS as exc:
                logger.warning("dcpp: step-time RPC failed (%s: %s); per-stage timing off",
                               type(exc).__name__, exc)
                self._off()
                return
            self.drain, self.drain_age = (future, steps), 0
            self._workers_every = self.every
            if idle:
                self.poll(idle=True, sink=sink)

    def _match(self, results: list, steps: list[SentStep], sink: StepSink) -> None:
        """Pair each sent step with one time per PP rank (in order per fingerprint), hand the
        complete prefill steps to `sink` and every complete step's per-stage intervals (from
        the records' start times, where the workers sent them) to the bubble tracker."""
        # pp_rank -> fingerprint -> [(seconds, start or None)]; a record is (fingerprint,
        # seconds) or (fingerprint, seconds, start in wall-clock seconds).
        per_rank: dict[int, dict[int, list[tuple[float, float | None]]]] = {}
        for r in sorted(results, key=lambda r: int(r.get("pp_rank", -1))):
            rank = int(r.get("pp_rank", -1))
            table = per_rank.setdefault(rank, {})
            for rec in r.get("times", []):
                start = float(rec[2]) if len(rec) > 2 and rec[2] is not None else None
                table.setdefault(int(rec[0]), []).append((float(rec[1]), start))
        last = max((s.index for s in steps), default=-1)
        for step in steps if per_rank else ():
            got_all = []
            for table in per_rank.values():  # stage order
                got = table.get(step.fingerprint)
                if got:
                    got_all.append(got.pop(0))
            if len(got_all) != len(per_rank):
                continue
            if step.index >= 0 and all(start is not None for _, start in got_all):
                self.bubbles.spans(step.index, [start for _, start in got_all],
                                   [start + secs for secs, start in got_all])
            if not step.has_prefill:
                continue
            measured = max(secs for secs, _ in got_all)  # the slowest stage sets the pace
            if measured <= 0:
                continue
            sink(step.batch, measured, step.interval)
        if last >= 0:  # the drained steps without a full set of spans are missing
            self.bubbles.resolved(last)
