"""Calibration through dcpp's runtime (`DcppRuntime`, which imports no vLLM module) on fake
steps: both measurement sources, drift, the per-step overhead, refits, saved calibration. No
engine is started (also in `make test-fast`); test_scheduler_logic.py has profiling and
chunk sizing."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from dcpp.online.stage_timing import step_is_timed
from dcpp.tooling import fake_engine
from dcpp.tooling.fake_engine import BUDGET, FakeExecutor, req, sched, true_time


def runtime(tmp_path, monkeypatch, executor=None, **kw):
    """The runtime under test: profile cache in `tmp_path`, driven as vLLM would."""
    return fake_engine.isolated_runtime(monkeypatch, tmp_path, executor, **kw)


def _run_interval_steps(rt, n, fn, start=0):
    """`n` single-prefill steps measured only by their output intervals (no stage timing)."""
    t = rt.ledger.last_output_t if rt.ledger.last_output_t is not None else 0.0
    rt.ledger.last_output_t = t
    for i in range(start, start + n):
        c, h = 256 + 64 * (i % 8), 512 * (i % 16)
        r = req(f"r{i}", h + c + 100, computed=h + c)
        s = sched([r])
        s.requests = {r.request_id: r}
        out = NS(num_scheduled_tokens={r.request_id: c})
        rt.end_step(s, out)
        rt.ledger._queue[-1].scheduled_at = t - 1e-4  # queued behind the previous step
        t += fn(c, h)
        rt.on_output(out, t)


@pytest.mark.parametrize("source", ["intervals", "stage times"])
def test_one_calibrator_for_both_sources(tmp_path, monkeypatch, source):
    """The same rules learn a 1.5x slower engine from step intervals (no per-stage timing)
    and from per-stage times."""
    ex = FakeExecutor(step_timing=source == "stage times")
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.cal is not None and rt.stage_timing == (source == "stage times")
    if source == "intervals":
        _run_interval_steps(rt, 128, lambda c, h: 1.5 * true_time(c, h))
    else:
        _run_timed_steps(rt, ex, 128, 0.0, factor=1.5)
    assert rt.cal.num_refits > 0 and rt.cal.median_error() < 0.05
    assert rt.cal.model.predict_time(512, 4096) == pytest.approx(
        1.5 * true_time(512, 4096), rel=0.05)


@pytest.mark.parametrize("threshold, forced", [(0.10, True), (5.0, False)])
def test_drift_threshold_acts_on_the_interval_source(tmp_path, monkeypatch, threshold,
                                                     forced):
    """After calibration the engine gets 2x slower: with drift_threshold 0.10 the recent
    errors force a refit within 8 steps; with 5.0 nothing is forced (the periodic refit and
    the fast scale remain)."""
    from dcpp.online.calibration import calibrator

    monkeypatch.setattr(calibrator, "REFIT_EVERY", 10_000)  # only drift refits the base
    ex = FakeExecutor()
    vc_block = {"drift_threshold": threshold}
    rt = runtime(tmp_path, monkeypatch, executor=ex, extra=vc_block)
    _run_interval_steps(rt, 64, true_time)
    events = rt.cal.drift_events
    _run_interval_steps(rt, 12, lambda c, h: 2.0 * true_time(c, h), start=64)
    assert (rt.cal.drift_events > events) == forced


def test_stage_timing_calibrates_compute_and_learns_overhead(tmp_path, monkeypatch):
    """Workers' per-stage compute times calibrate the model (slowest stage); the step interval
    minus that compute, on steady steps only (bubbles of growing steps excluded), is the
    per-step overhead, which the planning model adds to c."""
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    assert rt.stage_timing
    overhead = 4e-3
    _run_timed_steps(rt, ex, 64, overhead)
    assert rt.cal.num_refits > 0
    assert rt.cal.median_error() < 0.05
    assert rt.cal.overhead_s() == pytest.approx(overhead, rel=0.05)
    assert rt.model.c == pytest.approx(rt.cal.model.c + rt.cal.overhead_s())


def test_a_few_steps_from_one_region_do_not_rescale_the_whole_model(tmp_path, monkeypatch):
    """The fast scale follows the machine, not one region: right after a refit, the tail of one
    long prompt running 40% slower than the model (a shape error there, or a burst of noise)
    must not make every other step 40% dearer; a machine that really got slower (every step)
    is followed within a few dozen steps."""
    from dcpp.online import runtime as sched_mod

    monkeypatch.setattr(sched_mod, "TIMING_SAMPLE_EVERY", 1)  # the scale's rule, not sampling
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 64, 0.0, factor=1.0)  # the 64th step triggers a refit
    refits = rt.cal.num_refits
    assert refits > 0
    _run_timed_steps(rt, ex, 8, 0.0, factor=1.4, shape=lambda i: (256, 14336 + 256 * i))
    assert rt.cal.num_refits - refits <= 1  # not a new base fit: the fast scale's doing
    small = rt.cal.model.predict_time(512, 1024) / true_time(512, 1024)
    assert small == pytest.approx(1.0, abs=0.1), f"a short prompt now predicted {small:.2f}x"
    _run_timed_steps(rt, ex, 48, 0.0, factor=1.5)
    assert rt.cal.model.predict_time(512, 1024) / true_time(512, 1024) == pytest.approx(
        1.5, rel=0.1)


def test_calibrated_workers_time_one_step_in_eight_and_every_step_on_drift(tmp_path,
                                                                          monkeypatch):
    """Until calibrated every step is timed (a device sync each); then 1 in 8; when the
    machine gets slower the error rises above drift_threshold and every step is timed again
    until the model follows."""
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 64, 4e-3)
    assert ex.synced == 64 and rt.timing.every == 8
    ex.synced = 0
    _run_timed_steps(rt, ex, 400, 4e-3)
    assert rt.timing.every == 8
    assert 400 / 16 < ex.synced < 400 / 4, ex.synced  # about 1 in 8
    assert rt.stats()["timed_steps"] < rt.stats()["tracked_steps"]
    ex.synced = 0
    _run_timed_steps(rt, ex, 200, 4e-3, factor=2.0)  # twice as slow from now on
    assert ex.synced > 200 / 4  # drift: every step timed for a while
    assert rt.cal.model.predict_time(512, 1024) == pytest.approx(
        2.0 * true_time(512, 1024), rel=0.1)


def _shape(i):
    """(chunk, history) of step i: shapes mostly grow step to step; every 4th step repeats the
    previous shape (a steady pipeline for a moment)."""
    k = i - (i + 1) // 4
    return 256 + 64 * (k % 8), 512 * (k % 16)


def _run_timed_steps(rt, ex, n, overhead, factor=1.3, shape=_shape):
    """`n` single-prefill steps whose stages take 0.9x and 1.0x of factor * true_time, spaced
    by that plus `overhead` seconds, plus a pipeline bubble as long as the growth over the
    previous step (what a real pipeline shows when steps grow); per-stage times come back
    through the fake drain RPC."""
    from dcpp.integration.vllm import vllm_compat

    slower = lambda c, h: factor * true_time(c, h)  # noqa: E731 - the real stage is slower
    t, prev = (rt.ledger.last_output_t or 0.0), None
    rt.ledger.last_output_t = t
    for i in range(n):
        c, h = shape(i)
        r = req(f"r{i}", h + c + 100)
        r.num_computed_tokens = h + c
        s = sched([r])
        s.requests = {r.request_id: r}
        out = NS(num_scheduled_tokens={r.request_id: c})
        rt.end_step(s, out)
        rt.ledger._queue[-1].scheduled_at = t - 1e-4  # queued behind the previous step
        fp = vllm_compat.step_fingerprint(out)
        if step_is_timed(fp, ex.every):  # what a worker's sampled timer records
            ex.synced += 1
            ex.queued.append((fp, (0.9 * slower(c, h), slower(c, h))))
        bubble = max(0.0, slower(c, h) - prev) if prev is not None else 0.0
        t += slower(c, h) + overhead + bubble
        prev = slower(c, h)
        rt.on_output(out, t, idle=(i % 8 == 7))


def test_metrics_endpoint_reports_chunks_errors_and_closes(tmp_path, monkeypatch):
    pytest.importorskip("prometheus_client", reason="needs prometheus_client (comes with vllm)")
    import urllib.request

    from dcpp.tooling.harness import free_port

    port = free_port()
    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex, metrics_port=port)
    try:
        _run_timed_steps(rt, ex, 16, 4e-3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        rt.close()
    values = {line.split(" ")[0]: float(line.split(" ")[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["dcpp_prefill_chunk_tokens_count"] == 16
    assert values["dcpp_prefill_chunk_tokens_sum"] == sum(_shape(i)[0] for i in range(16))
    assert values["dcpp_chunk_latency_prediction_error_count"] == len(rt.cal.step_log) == 16
    assert values["dcpp_profile_passes"] == rt.profile.passes > 0
    assert values["dcpp_dynamic_chunking_active"] == 1
    assert values["dcpp_latency_model_scale"] == pytest.approx(rt.cal.scale)
    assert values["dcpp_step_overhead_seconds"] == pytest.approx(rt.cal.overhead_s())
    # Closed with the runtime: a restarted engine's endpoint can take the port again.
    from dcpp.integration.vllm.metrics import start_metrics as restart

    again = restart(port)
    assert again is not None
    again.close()


def _pipeline_output_times(compute, gap, in_flight=2):
    """When each step leaves the last stage (s from the first step's start): a flow shop whose
    stage r runs step k for compute[k][r] + `gap` s (`gap`: what each stage step costs beyond
    the compute the workers time: launch, hand-off, turnaround), at most `in_flight` steps in
    the pipeline (vLLM's batch queue)."""
    import numpy as np

    from dcpp.chunker.simulate import simulate_times

    times = np.asarray(compute, dtype=float).T + gap  # [stage, step]
    res = simulate_times(times, max_in_flight=in_flight)
    last = times.shape[0] - 1
    return [end for stage, _, _, end in res.timeline if stage == last]


@pytest.mark.parametrize("stage_scale", [(1.0, 1.0), (1.0, 1.1)], ids=["equal", "10%-apart"])
def test_whole_prefill_times_teach_the_per_step_cost(tmp_path, monkeypatch, stage_scale):
    """Planned requests run alone on a 2-stage pipeline where every stage step costs `gap` s
    beyond the compute the workers time; the clock is that pipeline's (a flow-shop simulation
    of the steps dcpp really scheduled, two in flight), not a formula of dcpp's. What
    calibration learns from the whole prefills is that gap, which the planner then charges per
    step, so later plans use fewer chunks.

    Tolerance: with equal stages the learnt cost is `gap` but for the compute model's error
    (refit on these very steps: < 1% of a prefill's ~0.12 s of compute, spread over its K + 1
    >= 7 steps: < 0.2 ms). Dividing by the wrong number of steps (K instead of K + P - 1) or
    leaving out the pipeline's fill would err by a step's share of `gap` or of the compute
    (> 2 ms here). With stage 0 10% faster than the slowest stage, dcpp's TTFT model (every
    stage at the slowest one's pace) overcharges the pipeline's fill, so the learnt cost is
    low, by at most (the longest step's compute - the first step's on stage 0) / (K + 1)."""
    from dcpp.online import runtime as sched_mod
    from dcpp.integration.vllm import vllm_compat

    clock = [100.0]
    monkeypatch.setattr(sched_mod, "time", NS(monotonic=lambda: clock[0]))
    ex = FakeExecutor(step_timing=True, stage_scale=stage_scale)  # profiled as they run
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    chunks_before = rt.predictors["pipeline"].plan(6000, history=0)
    gap, fit_error = 0.02, 2e-4
    fill_overcharge = 0.0  # the bound on the stages' difference's share (s per step)
    for k in range(4):
        r = req(f"p{k}", 6000)
        s = sched([r], requests={r.request_id: r})
        t0 = clock[0]
        compute, in_flight = [], []  # per step: compute per stage; (output, output time)
        while r.num_computed_tokens < r.num_tokens or in_flight:
            if r.num_computed_tokens < r.num_tokens and len(in_flight) < 2:
                rt.begin_step(s)  # a slot is free: vLLM schedules the next chunk
                h = r.num_computed_tokens
                c = rt.cap(s, r, h, min(BUDGET, r.num_tokens - h))
                r.num_computed_tokens += c
                out = NS(num_scheduled_tokens={r.request_id: c})
                rt.end_step(s, out)
                compute.append([scale * true_time(c, h) for scale in stage_scale])
                ex.queued.append((vllm_compat.step_fingerprint(out), compute[-1]))
                in_flight.append((out, t0 + _pipeline_output_times(compute, gap)[-1]))
                continue
            out, clock[0] = in_flight.pop(0)  # the oldest step's output comes back
            rt.on_output(out, clock[0], idle=not in_flight)
        assert len(compute) >= 4  # a measured whole prefill (prefill_log.MIN_MEASURED_CHUNKS)
        if stage_scale[0] != stage_scale[1]:
            longest = max(max(step) for step in compute)
            fill_overcharge = max(fill_overcharge,
                                  (longest - compute[0][0]) / (len(compute) + 1))
        clock[0] += 1.0
    assert len(rt.cal.overhead.request_gaps) == 4
    learnt = rt.cal.overhead_s()
    assert gap - fill_overcharge - fit_error <= learnt <= gap + fit_error, (learnt,
                                                                            fill_overcharge)
    assert rt.model.c == pytest.approx(rt.cal.model.c + learnt)
    assert len(rt.predictors["pipeline"].plan(6000, history=0)) < len(chunks_before)


def test_online_refit_corrects_a_wrong_profile_shape(tmp_path, monkeypatch):
    """A start-up profile with the wrong shape (4x the chunk^2 cost) is corrected by refits on
    the real step timings; a single scale factor could not match all chunk sizes."""
    wrong = lambda c, h: 2e-3 + 2e-6 * c + 4e-9 * c * h + 8e-9 * c * c  # noqa: E731
    ex = FakeExecutor(fn=wrong, step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 128, 4e-3)  # real stages: 1.3 * true_time at the slowest
    assert rt.cal.last_refit_error is None and rt.cal.base is not rt.cal.profile_model
    for c, h in [(256, 0), (704, 7680), (512, 4096), (320, 6144)]:
        assert rt.cal.model.predict_time(c, h) == pytest.approx(1.3 * true_time(c, h),
                                                                    rel=0.03)


def test_restart_starts_from_the_saved_calibration(tmp_path, monkeypatch):
    """What calibration learnt (refit window, per-step overhead) is saved at shutdown beside the
    profile; a restart with the same cache key loads it and plans like the engine it replaces,
    without profiling and without waiting for new step timings."""
    from dcpp.online.calibration import store as calibration_store

    wrong = lambda c, h: 2e-3 + 2e-6 * c + 4e-9 * c * h + 8e-9 * c * c  # noqa: E731
    ex = FakeExecutor(fn=wrong, step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    overhead = 4e-3
    _run_timed_steps(rt, ex, 96, overhead)
    path = calibration_store.path_for(rt.profile.path)
    import os

    assert os.path.exists(path)  # saved when the engine went idle, before any shutdown
    rt.close()
    assert rt.cal.overhead_s() == pytest.approx(overhead, rel=0.05)

    ex2 = FakeExecutor(fn=wrong, step_timing=True)
    rt2 = runtime(tmp_path, monkeypatch, executor=ex2)
    assert rt2.profile.source == "cache" and ex2.calls == 0
    assert len(rt2.cal.samples) == len(rt.cal.samples) > 64 and rt2.cal.num_observations == 0
    assert rt2.cal.overhead_s() == pytest.approx(rt.cal.overhead_s())
    assert rt2.model.c == pytest.approx(rt2.cal.model.c + overhead, rel=0.05)
    for c, h in [(256, 0), (704, 7680), (512, 4096)]:  # the profile's shape is corrected
        assert rt2.cal.model.predict_time(c, h) == pytest.approx(1.3 * true_time(c, h),
                                                                     rel=0.03)
    assert rt2.predictors["pipeline"].plan(6000) == rt.predictors["pipeline"].plan(6000)
    rt2.close()

    # Re-profiling (the profile file gone) makes the calibration obsolete: it is removed.
    os.unlink(rt.profile.path)
    rt3 = runtime(tmp_path, monkeypatch, executor=FakeExecutor(fn=wrong, step_timing=True))
    assert rt3.profile.source == "profiled" and not os.path.exists(path)
    assert len(rt3.cal.samples) == 0 and rt3.cal.overhead_s() == 0.0


@pytest.mark.parametrize("damage", ["not json", "other key", "other profile", "bad sample"])
def test_unusable_calibration_file_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog,
                                                             damage):
    import json
    import logging

    from dcpp.online.calibration import store as calibration_store

    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    _run_timed_steps(rt, ex, 16, 4e-3)
    rt.close()
    path = calibration_store.path_for(rt.profile.path)
    doc = json.loads(open(path).read())
    if damage == "not json":
        text = "{"
    else:
        if damage == "other key":
            doc["cache_key"]["max_model_len"] = 1
        elif damage == "other profile":
            doc["profile_digest"] = "0" * 16
        else:
            doc["step_samples"][3][1] = -1.0
        text = json.dumps(doc)
    with open(path, "w") as f:
        f.write(text)
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        rt2 = runtime(tmp_path, monkeypatch, executor=FakeExecutor(step_timing=True))
    assert "ignoring calibration file" in caplog.text
    assert rt2.profile.source == "cache" and rt2.model is not None
    assert len(rt2.cal.samples) == 0 and rt2.cal.overhead_s() == 0.0


def test_unwritable_calibration_file_warns_once_and_serving_goes_on(tmp_path, monkeypatch, caplog):
    import logging

    ex = FakeExecutor(step_timing=True)
    rt = runtime(tmp_path, monkeypatch, executor=ex)
    rt.saver.path = str(tmp_path / "no-such-dir" / "x.calibration.json")
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        _run_timed_steps(rt, ex, 32, 4e-3)  # idle every 8 steps: several save attempts
        rt.close()
    assert caplog.text.count("could not save calibration") == 1
    assert rt.cal.num_observations == 32 and rt.cal.median_error() < 0.05
