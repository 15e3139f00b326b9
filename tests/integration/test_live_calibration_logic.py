"""Live calibration in `DcppRuntime` (no vLLM, fake requests and executor): selected with
`live_calibration`, or chosen by dcpp when the workers report that their model runner cannot
time a prefill after a history. Static chunks and no profiling until the step timings suffice;
then one fit, dynamic chunking, the fit cached as the profile."""

from __future__ import annotations

from dcpp.online.stage_timing import step_is_timed

import logging
from types import SimpleNamespace as NS

import pytest

from test_scheduler_logic import (
    BUDGET,
    SCHED,
    FakeExecutor,
    req,
    runtime,
    sched,
    true_time,
)

# Remainders 80, 228, 456, 652, 808, 104, 132, 428: chunk sizes down to < budget/4.
PROMPTS = [5200, 3300, 6600, 2700, 9000, 4200, 7300, 3500]
LONG = 12000
V2_REASON = ("vllm.v1.worker.gpu.model_runner.GPUModelRunner._dummy_run(num_tokens, *args, "
             "**kwargs) does not name force_attention and profile_seq_lens")


def static(n):
    return [BUDGET] * (n // BUDGET) + ([n % BUDGET] if n % BUDGET else [])


def serve(rt, ex, rid, n, clock, timed=True):
    """Prefill one `n`-token prompt alone, each step's chunk asked of `rt.cap` (vLLM offers
    min(budget, rest)); the stages take 0.9x and 1.0x of `true_time`, reported through the
    fake drain RPC (`timed`), else measured by the step intervals. Returns the chunks."""
    from dcpp.integration.vllm import vllm_compat

    h, chunks = 0, []
    while h < n:
        r = req(rid, n, computed=h)
        s = sched([r])
        rt.begin_step(s)
        c = rt.cap(SCHED, r, h, min(BUDGET, n - h))
        r.num_computed_tokens = h + c  # vLLM advances it at schedule time
        s.requests = {rid: r}
        out = NS(num_scheduled_tokens={rid: c})
        rt.end_step(s, out)
        secs = true_time(c, h)
        if timed:
            fp = vllm_compat.step_fingerprint(out)
            if step_is_timed(fp, ex.every):
                ex.queued.append((fp, (0.9 * secs, secs)))
        elif len(rt.ledger):
            rt.ledger._queue[-1].scheduled_at = clock[0] - 1e-4  # queued behind the last step
        clock[0] += secs
        h += c
        chunks.append(c)
        rt.on_output(out, clock[0], idle=h >= n)
    return chunks


def serve_until_dynamic(rt, ex, clock, timed=True):
    for i, n in enumerate(PROMPTS * 3):
        if rt.live is None:
            return i
        assert serve(rt, ex, f"p{i}", n, clock, timed) == static(n)  # vLLM's chunks meanwhile
    return None


def test_live_calibration_starts_static_and_switches_once_it_can_fit(tmp_path, monkeypatch,
                                                                    caplog):
    ex = FakeExecutor(step_timing=True)
    with caplog.at_level(logging.INFO, logger="vllm.dcpp"):
        rt = runtime(tmp_path, monkeypatch, executor=ex, extra={"live_calibration": True})
        assert ex.calls == 0 and rt.profile.passes == 0  # no profiling RPC at all
        assert rt.model is None and rt.live is not None and rt.stage_timing
        assert "no start-up profiling" in caplog.text
        clock = [0.0]
        served = serve_until_dynamic(rt, ex, clock)
    assert served is not None, rt.live.missing()
    line = [m for m in caplog.messages if "dynamic chunking on" in m]
    assert len(line) == 1 and "live calibration: fitted" in line[0], caplog.messages
    assert rt.model is not None and rt.cal is not None and rt.sizer is not None
    assert rt.profile.source == "live" and rt.cal is not None
    assert rt.cal.model.predict_time(512, 4096) == pytest.approx(true_time(512, 4096), rel=0.05)
    assert rt.cal.profile_samples  # calibration refits on the live steps
    chunks = serve(rt, ex, "after", LONG, clock)
    assert sum(chunks) == LONG and chunks != static(LONG)
    assert rt.cal.num_observations > 0  # calibration goes on from the live fit
    # The fit is this engine's profile now: the next start loads it and plans at once.
    import os

    assert os.path.exists(rt.profile.path)
    rt.close()  # what calibration learnt since is saved beside it
    assert os.path.exists(rt.saver.path)
    ex2 = FakeExecutor(step_timing=True)
    with caplog.at_level(logging.INFO, logger="vllm.dcpp"):
        rt2 = runtime(tmp_path, monkeypatch, executor=ex2, extra={"live_calibration": True})
    assert rt2.profile.source == "cache" and rt2.profile.passes == 0 and ex2.calls == 0
    assert rt2.live is None and rt2.model is not None
    assert "calibration loaded from" in caplog.text and len(rt2.cal.samples) > 0
    assert serve(rt2, ex2, "restart", LONG, [0.0]) != static(LONG)


def unsupported_runner():
    """Workers whose model runner cannot time a prefill after a history (vLLM's V2 runner)."""
    return FakeExecutor(step_timing=True, reply=lambda n, h: [
        {"pp_rank": r, "tp_rank": 0, "seconds": None, "unsupported": V2_REASON}
        for r in range(2)])


def test_unsupported_runner_is_reported_and_calibrated_live(tmp_path, monkeypatch, caplog):
    ex = unsupported_runner()
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert ex.calls == 1 and rt.profile.passes == 0  # the first RPC said so: no retry
    assert rt.model is None and rt.live is not None
    assert "cannot run on this engine's model runner" in caplog.text
    assert "pp_rank 0 tp_rank 0: " + V2_REASON in caplog.text
    assert "calibrating from live traffic" in caplog.text
    assert serve_until_dynamic(rt, ex, [0.0]) is not None
    assert rt.model is not None


def test_unsupported_runner_without_timing_stays_static(tmp_path, monkeypatch, caplog):
    ex = unsupported_runner()
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        rt = runtime(tmp_path, monkeypatch, executor=ex, need_timing=False)
    assert rt.model is None and rt.live is None and not rt.stage_timing
    assert "falling back to static chunking" in caplog.text
    assert serve(rt, ex, "a", LONG, [0.0], timed=False) == static(LONG)


def test_live_calibration_on_step_intervals_without_stage_timing(tmp_path, monkeypatch):
    """Where the workers cannot time their stage, the step intervals are the measurement (the
    calibrator's rule: only steps queued behind another)."""
    ex = FakeExecutor(step_timing=False)
    rt = runtime(tmp_path, monkeypatch, executor=ex, extra={"live_calibration": True})
    assert rt.live is not None and not rt.stage_timing
    assert serve_until_dynamic(rt, ex, [0.0], timed=False) is not None
    assert rt.model.predict_time(512, 4096) == pytest.approx(true_time(512, 4096), rel=0.1)

