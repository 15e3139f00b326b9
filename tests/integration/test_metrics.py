"""dcpp's Prometheus endpoint (`metrics_port`): served, scraped, closed, port conflicts."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client",
                                        reason="needs prometheus_client (a vLLM dependency)")

from dcpp.integration.vllm.metrics import start_metrics  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_metrics_served_and_closed():
    port = _free_port()
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
