"""Per-stage step timing with executors whose non-blocking futures never report done.

vLLM 0.32's legacy Ray executor (`RayDistributedExecutor`, with
`VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0`) answers `collective_rpc(..., non_block=True)` with a
`FutureWrapper`: a `concurrent.futures.Future` subclass that overrides only `result()`
(`ray.get`), so its `done()` stays False for ever. dcpp collects the workers' step times with
such non-blocking drain RPCs; under load (the engine never idle) it must still read them, or
calibration would stall. No vLLM or Ray is needed: the runtime is driven on fake steps, as in
test_scheduler_logic.py.
"""

from __future__ import annotations

from dcpp.online.stage_timing import step_is_timed

import concurrent.futures
from types import SimpleNamespace as NS

import pytest

from dcpp.tooling.fake_engine import FakeExecutor, isolated_runtime, req, sched, true_time

NUM_STAGES = 2


class NeverDoneFuture(concurrent.futures.Future):
    """Ray's `FutureWrapper`: `result()` fetches the answer (here: already there, as the
    actors ran the RPC long ago); `done()` is `Future`'s own and never turns true."""

    def __init__(self, value, executor):
        super().__init__()
        self.value, self.executor = value, executor

    def result(self, timeout=None):
        self.executor.reads.append(self.executor.outputs)
        return self.value


class MpLikeFuture(concurrent.futures.Future):
    """vLLM's multiprocessing future: done once `NUM_STAGES` more step outputs came back (its
    queue resolves in order behind the steps that were in flight when it was sent)."""

    def __init__(self, value, executor):
        super().__init__()
        self.value, self.executor, self.sent_at = value, executor, executor.outputs

    def done(self):
        return self.executor.outputs - self.sent_at >= NUM_STAGES

    def result(self, timeout=None):
        assert self.done(), "would block on steps still in flight"
        self.executor.reads.append(self.executor.outputs)
        return self.value


def executor(future_cls):
    """The shared fake workers, with futures of `future_cls` and the counters they keep."""
    ex = FakeExecutor(step_timing=True, num_stages=NUM_STAGES, future=future_cls)
    ex.outputs = 0  # step outputs the scheduler has seen (the engine's progress)
    ex.reads = []  # `outputs` at each drain read
    ex.timed = 0  # steps the workers timed
    return ex


def runtime(tmp_path, monkeypatch, executor):
    return isolated_runtime(monkeypatch, tmp_path, executor)


def run_busy_steps(rt, ex, n):
    """`n` single-prefill steps back to back, the engine never idle; each step's workers
    record their stage times (stage 1 the slower) when their timer samples it."""
    from dcpp.integration.vllm import vllm_compat

    t = rt.ledger.last_output_t or 0.0
    rt.ledger.last_output_t = t
    for i in range(n):
        c, h = 256 + 64 * (i % 8), 512 * (i % 16)
        r = req(f"r{ex.outputs}", h + c + 100, computed=h + c)
        s = sched([r], requests={r.request_id: r})
        out = NS(num_scheduled_tokens={r.request_id: c})
        rt.end_step(s, out)
        rt.ledger._queue[-1].scheduled_at = t - 1e-4
        fp = vllm_compat.step_fingerprint(out)
        if step_is_timed(fp, ex.every):
            ex.timed += 1
            ex.queued.append((fp, (0.9 * 1.3 * true_time(c, h), 1.3 * true_time(c, h))))
        t += 1.3 * true_time(c, h) + 4e-3
        ex.outputs += 1
        rt.on_output(out, t, idle=False)


@pytest.mark.parametrize("future_cls", [NeverDoneFuture, MpLikeFuture],
                         ids=["legacy-ray", "multiprocessing"])
def test_calibration_gets_stage_times_when_futures_never_report_done(tmp_path, monkeypatch,
                                                                     future_cls):
    ex = executor(future_cls)
    rt = runtime(tmp_path, monkeypatch, ex)
    assert rt.stage_timing and rt.model is not None
    run_busy_steps(rt, ex, 200)
    # The drains were read while the engine stayed busy (it never went idle) ...
    assert ex.reads, "no drain RPC was ever read: calibration stalled"
    assert rt.stage_timing, "per-stage timing switched itself off"
    # ... and every step the workers timed reached calibration but those of the last drains
    # (every step until calibrated, then 1 in 8).
    assert ex.timed > 64
    assert ex.timed - 16 <= rt.cal.num_observations <= ex.timed, (rt.cal.num_observations, ex.timed)
    assert rt.cal.num_refits > 0
    # Calibration follows the stages' real speed (1.3x the profile's).
    assert rt.cal.model.predict_time(512, 1024) == pytest.approx(
        1.3 * true_time(512, 1024), rel=0.15)
    # Nothing piles up: at most one drain in flight, few steps waiting for one.
    assert len(rt.timing.sent) < 16


def test_drain_of_a_never_done_future_waits_for_the_steps_in_flight(tmp_path, monkeypatch):
    """The drain is read once the steps that were in flight when it was sent (PP of them)
    have come back, not at once: before that a multiprocessing executor's result() would wait
    on a running step."""
    ex = executor(NeverDoneFuture)
    rt = runtime(tmp_path, monkeypatch, ex)
    sent_at = []
    real = ex.collective_rpc

    def recording(method, *a, **kw):
        if kw.get("non_block"):
            sent_at.append(ex.outputs)
        return real(method, *a, **kw)

    ex.collective_rpc = recording
    run_busy_steps(rt, ex, 100)
    assert len(ex.reads) >= 5
    for sent, read in zip(sent_at, ex.reads):
        assert read - sent >= NUM_STAGES, (sent_at, ex.reads)
        assert read - sent <= NUM_STAGES + 1, (sent_at, ex.reads)
