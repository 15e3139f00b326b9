"""A bug in dcpp's own code reaches the caller; only the workers' RPC errors are caught.

Through the runtime, driven as vLLM's scheduler drives it (`fake_engine.isolated_runtime`): a
calibrator that raises TypeError makes `on_output` raise it, on the per-stage timing path (the
drain's records matched and handed to calibration) and on the step-interval path alike, with
no "collecting step times failed" warning and per-stage timing still on. A worker RPC that
fails (RuntimeError from the drain's future, or from sending the drain) turns per-stage timing
off with one warning, and calibration goes on with step intervals.
"""

from __future__ import annotations

import concurrent.futures
import time
from types import SimpleNamespace as NS

import pytest

from dcpp.tooling.fake_engine import (BUDGET, FakeExecutor, dcpp_log, isolated_runtime,
                                      fingerprint, req, sched, true_time)


@pytest.fixture
def warnings_log(caplog):
    with dcpp_log(caplog):
        yield caplog


def runtime(tmp_path, monkeypatch, executor):
    rt = isolated_runtime(monkeypatch, tmp_path, executor)
    assert rt.cal is not None  # profiled: calibrating
    return rt


def schedule(rt, rid, n, history=0):
    """One step of a single prefill of `n` tokens after `history`: scheduled, then handed to
    the ledger (vLLM's `schedule()` returning). Returns the step's output."""
    r = req(rid, history + n + 100, computed=history)
    s = sched([r], requests={rid: r})
    rt.begin_step(s)
    c = rt.cap(s, r, history, min(BUDGET, n))
    r.num_computed_tokens += c
    out = NS(num_scheduled_tokens={rid: c})
    rt.end_step(s, out)
    return out, c


def broken_observe(*args, **kwargs):
    raise TypeError("observe() takes 3 positional arguments but 4 were given")


def test_a_calibrator_bug_on_the_stage_timing_path_propagates(tmp_path, monkeypatch,
                                                              warnings_log):
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, ex)
    assert rt.stage_timing
    monkeypatch.setattr(rt.cal, "observe", broken_observe)
    out, c = schedule(rt, "a", 512)
    ex.queued.append((fingerprint(out), (true_time(c, 0), 1.1 * true_time(c, 0))))
    with pytest.raises(TypeError, match="positional arguments"):
        rt.on_output(out, time.monotonic() + 1.0, idle=True)  # idle: the drain is read now
    assert ex.drains == 1  # the records were collected and matched: calibration raised
    assert rt.stage_timing, "a bug in calibration switched per-stage timing off"
    assert "collecting step times failed" not in warnings_log.text
    assert not warnings_log.records


def test_a_calibrator_bug_on_the_step_interval_path_propagates(tmp_path, monkeypatch,
                                                               warnings_log):
    ex = FakeExecutor(step_timing=False)  # workers that cannot time: step intervals
    rt = runtime(tmp_path, monkeypatch, ex)
    assert not rt.stage_timing
    warnings_log.clear()  # the start-up warning that per-stage timing is unavailable
    monkeypatch.setattr(rt.cal, "observe", broken_observe)
    first, _ = schedule(rt, "a", 512)
    second, _ = schedule(rt, "b", 512, history=4096)  # queued behind the first
    t = time.monotonic()
    rt.on_output(first, t + 1.0)  # the first output of a burst measures nothing
    with pytest.raises(TypeError, match="positional arguments"):
        rt.on_output(second, t + 1.01)  # its interval goes to the calibrator
    assert not warnings_log.records


def failed_future(value, executor):
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(RuntimeError("Worker failed with error 'socket closed'"))
    return future


def failing_send(value, executor):
    raise RuntimeError("executor is shut down")


@pytest.mark.parametrize("future, message", [
    (failed_future, "collecting step times failed (RuntimeError: Worker failed"),
    (failing_send, "step-time RPC failed (RuntimeError: executor is shut down"),
], ids=["drain-future", "drain-send"])
def test_a_worker_rpc_error_turns_stage_timing_off_with_one_warning(
        tmp_path, monkeypatch, warnings_log, future, message):
    ex = FakeExecutor(step_timing=True, future=future)
    rt = runtime(tmp_path, monkeypatch, ex)
    assert rt.stage_timing
    t = time.monotonic()
    for i in range(6):  # every output idle: a drain each time timing is on
        out, c = schedule(rt, f"r{i}", 256 + 64 * i, history=512 * i)
        ex.queued.append((fingerprint(out), (true_time(c, 512 * i),) * 2))
        rt.on_output(out, t + i, idle=True)
    assert not rt.stage_timing
    assert ex.drains == 1  # none after the failure
    records = [r for r in warnings_log.records if "per-stage timing off" in r.getMessage()]
    assert len(records) == 1 and message in records[0].getMessage()
    assert len(warnings_log.records) == 1
    # Calibration goes on with the step intervals (both steps scheduled before the previous
    # output came back: each one's interval measures it).
    seen = rt.cal.num_observations
    a, _ = schedule(rt, "x", 512)
    b, _ = schedule(rt, "y", 512, history=2048)
    rt.on_output(a, t + 10.0)
    rt.on_output(b, t + 10.01)
    assert rt.cal.num_observations == seen + 2
