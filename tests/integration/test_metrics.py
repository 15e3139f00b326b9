"""dcpp's Prometheus endpoint (`metrics_port`): served, scraped, closed, port conflicts."""

from __future__ import annotations

from dcpp.tooling.fake_engine import (FakeExecutor, driven_runtime, fake_vllm_config, req,
                                      sched, true_time)
from dcpp.tooling.harness import free_port

import logging
import socket
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client",
                                        reason="needs prometheus_client (a vLLM dependency)")

from dcpp.integration.vllm.metrics import start_metrics  # noqa: E402


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_metrics_served_and_closed():
    port = free_port()
    m = start_metrics(port)
    try:
        m.chunk_tokens.observe(1024)
        m.chunk_tokens.observe(256)
        m.prediction_error.observe(0.04)
        m.profile_passes.set(16)
        text = _scrape(port)
    finally:
        m.close()
    assert "dcpp_prefill_chunk_tokens_count 2.0" in text
    assert 'dcpp_prefill_chunk_tokens_bucket{le="256.0"} 1.0' in text
    assert 'dcpp_chunk_latency_prediction_error_bucket{le="0.05"} 1.0' in text
    assert "dcpp_profile_passes 16.0" in text
    # Closed: a restarted engine's endpoint can take the port again.
    again = start_metrics(port)
    assert again is not None
    again.close()


def test_port_zero_is_off_and_taken_port_warns(caplog):
    assert start_metrics(0) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        log = logging.getLogger("vllm.dcpp")  # vLLM may stop "vllm" propagating to root
        log.addHandler(caplog.handler)
        try:
            assert start_metrics(port) is None
        finally:
            log.removeHandler(caplog.handler)
    assert f"cannot serve metrics on port {port}" in caplog.text
    assert "metrics_port" in caplog.text


# ------------------------------------------------------------------ measured bubbles
def test_bubble_histogram_served_with_plan_label():
    port = free_port()
    m = start_metrics(port)
    try:
        m.bubble_fraction.labels(plan="pipeline").observe(0.3)
        m.bubble_fraction.labels(plan="off").observe(0.45)
        m.bubble_fraction.labels(plan="off").observe(0.55)
        text = _scrape(port)
    finally:
        m.close()
    assert "# TYPE dcpp_prefill_bubble_fraction histogram" in text
    assert 'dcpp_prefill_bubble_fraction_bucket{le="0.3",plan="pipeline"} 1.0' in text
    assert 'dcpp_prefill_bubble_fraction_bucket{le="0.5",plan="off"} 1.0' in text
    assert 'dcpp_prefill_bubble_fraction_count{plan="off"} 2.0' in text
    assert 'dcpp_prefill_bubble_fraction_sum{plan="pipeline"} 0.3' in text
    from dcpp.integration.vllm.metrics import bubble_totals

    totals = bubble_totals(text)
    assert totals["off"][1] == 2 and totals["off"][0] == pytest.approx(1.0)
    assert totals["pipeline"] == (pytest.approx(0.3), 1)
    assert bubble_totals("") == {}


def _stage_timing(workers):
    from dcpp.integration.vllm.worker_rpc import VllmWorkerChannel
    from dcpp.online.stage_timing import StageTiming

    timing = StageTiming(VllmWorkerChannel(fake_vllm_config(), workers), num_stages=2)
    timing.enable()
    assert timing.on
    return timing


def test_stage_timing_measures_and_exports_a_prefills_bubbles(caplog):
    """The hand oracle of tests/online/test_bubbles.py through StageTiming: 3 chunks of one
    request, stage times (1, 1, 2) s and (1, 1, 1) s -> bubble fraction 0.3, logged at debug
    level, observed in the histogram under the request's plan, summarised for benchmarks."""
    from types import SimpleNamespace as NS

    from dcpp.integration.vllm import vllm_compat

    starts = [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]
    ends = [(1.0, 2.0), (2.0, 3.0), (4.0, 5.0)]
    chunks = [(100, 0), (100, 100), (200, 200)]
    workers = FakeExecutor(step_timing=True)
    timing = _stage_timing(workers)
    port = free_port()
    timing.metrics = start_metrics(port)
    sink = []
    log = logging.getLogger("vllm.dcpp")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="vllm.dcpp"):
            sent = []
            for k, (n, h) in enumerate(chunks):
                out = NS(num_scheduled_tokens={"req-1": n}, scheduled_new_reqs=(),
                         scheduled_cached_reqs=NS(num_computed_tokens=[h]))
                step = timing.track(vllm_compat.step_fingerprint(out), [(n, h)], True, prefills={"req-1": (n, h)},
                                    finishing=["req-1"] if k == 2 else [],
                                    labels={"req-1": "pipeline"} if k == 0 else {})
                workers.record(vllm_compat.step_fingerprint(out), starts[k], ends[k])
                sent.append(step)
                if k:  # outputs come back one step behind (2 stages in flight)
                    timing.poll(False, lambda *a: sink.append(a), returned=sent[k - 1])
            timing.poll(True, lambda *a: sink.append(a), returned=sent[-1])
        text = _scrape(port)
    finally:
        log.removeHandler(caplog.handler)
        timing.metrics.close()
    assert len(sink) == 3  # calibration still gets every prefill step (slowest stage)
    assert [s[1] for s in sink] == pytest.approx([1.0, 1.0, 2.0])
    summary = timing.bubble_summary()
    assert summary["measured"] == 1 and summary["unmeasured"] == 0
    assert summary["by_plan"]["pipeline"]["mean"] == pytest.approx(0.3)
    (r,) = timing.bubbles.results
    assert r.stage_idle == pytest.approx((0.2, 0.4)) and r.chunks == (100, 100, 200)
    assert "request req-1 prefill bubbles 30.0% (plan pipeline, 3 chunks" in caplog.text
    assert 'dcpp_prefill_bubble_fraction_bucket{le="0.3",plan="pipeline"} 1.0' in text
    assert 'dcpp_prefill_bubble_fraction_bucket{le="0.25",plan="pipeline"} 0.0' in text


def test_stage_timing_without_start_times_measures_nothing():
    """Workers that send (fingerprint, seconds) only (an older dcpp on the workers): calibration
    goes on, no bubble is made up."""
    from types import SimpleNamespace as NS

    from dcpp.integration.vllm import vllm_compat

    workers = FakeExecutor(step_timing=True)
    timing = _stage_timing(workers)
    out = NS(num_scheduled_tokens={"r": 64}, scheduled_new_reqs=(), scheduled_cached_reqs=None)
    step = timing.track(vllm_compat.step_fingerprint(out), [(64, 0)], True, prefills={"r": (64, 0)}, finishing=["r"])
    fp = vllm_compat.step_fingerprint(out)
    workers.queued = [(fp, (0.5, 0.6))]
    sink = []
    timing.poll(True, lambda *a: sink.append(a), returned=step)
    assert len(sink) == 1 and sink[0][1] == pytest.approx(0.6)
    assert timing.bubble_summary()["measured"] == 0
    assert timing.bubble_summary()["unmeasured"] == 1


def test_bubble_sampling_forces_full_timing_once_calibrated(monkeypatch):
    """DCPP_BUBBLE_SAMPLE_EVERY=N: calibration's 1-in-8 rate gives way to every step while a
    sampled prefill runs; 0 (the default) never does."""
    workers = FakeExecutor(step_timing=True)
    monkeypatch.setenv("DCPP_BUBBLE_SAMPLE_EVERY", "4")
    timing = _stage_timing(workers)
    timing.every = 8
    assert timing.every == 1  # armed: the next prefill will be measured
    monkeypatch.delenv("DCPP_BUBBLE_SAMPLE_EVERY")
    timing = _stage_timing(workers)
    timing.every = 8
    assert timing.every == 8
    monkeypatch.setenv("DCPP_BUBBLE_SAMPLE_EVERY", "-1")
    with pytest.raises(ValueError, match="DCPP_BUBBLE_SAMPLE_EVERY"):
        _stage_timing(workers)


def test_runtime_reports_bubbles_per_plan_in_stats_and_metrics(tmp_path, monkeypatch):
    """Through DcppRuntime (no vLLM): three prompts, each alone, with dcpp's plan, vLLM's
    chunks (dcpp_plan=off) and a fixed chunk (dcpp_chunk_size); the fake workers lay each
    step on a 2-stage flow shop. Each prefill's measured bubble equals the simulator's on the
    same stage times; stats() and the histogram carry it under the request's plan."""
    from types import SimpleNamespace as NS

    import numpy as np

    from dcpp.chunker.simulate import simulate_times
    from dcpp.integration.vllm import vllm_compat

    budget = 1024
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    port = free_port()
    workers = FakeExecutor(fn=true_time, step_timing=True, stage_scale=(1.0, 1.0))
    rt = driven_runtime(workers, budget=budget, metrics_port=port)
    try:
        assert rt.stage_timing
        expected = {}
        t = 100.0
        for rid, extra in (("a", None), ("b", {"dcpp_plan": "off"}),
                           ("c", {"dcpp_chunk_size": 700})):
            r = req(rid, 3000, extra=extra)
            sc = sched([r], budget=budget, requests={rid: r})
            ends, times, outs = [t, t], [], []
            while r.num_computed_tokens < r.num_tokens:
                rt.begin_step(sc)
                h = r.num_computed_tokens
                c = rt.cap(sc, r, h, min(budget, r.num_tokens - h))
                r.num_computed_tokens += c
                out = NS(num_scheduled_tokens={rid: c}, scheduled_new_reqs=(),
                         scheduled_cached_reqs=NS(num_computed_tokens=[h]))
                rt.end_step(sc, out)
                s = true_time(c, h)
                a0 = ends[0]
                a1 = max(a0 + s, ends[1])
                ends = [a0 + s, a1 + 1.2 * s]  # stage 1 is 20% slower
                workers.record(vllm_compat.step_fingerprint(out), (a0, a1), ends)
                times.append((s, 1.2 * s))
                outs.append(out)
                if len(outs) > 1:  # 2 steps in flight
                    rt.on_output(outs[-2], ends[1], idle=False)
            rt.on_output(outs[-1], ends[1], idle=True)
            expected[rid] = simulate_times(np.array(times).T).bubble_fraction
            t = ends[1] + 1.0
        by_plan = rt.stats()["bubbles"]["by_plan"]
        text = _scrape(port)
    finally:
        rt.close()
    assert set(by_plan) == {"pipeline", "off", "fixed"}
    for rid, plan in (("a", "pipeline"), ("b", "off"), ("c", "fixed")):
        assert by_plan[plan]["count"] == 1
        assert by_plan[plan]["mean"] == pytest.approx(expected[rid], rel=1e-9)
    assert rt.chunk_log["c"][:4] == [700, 700, 700, 700]
    assert rt.chunk_log["b"] == [1024, 1024, 952]
    assert 'dcpp_prefill_bubble_fraction_count{plan="fixed"} 1.0' in text
