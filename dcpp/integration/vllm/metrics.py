"""dcpp's Prometheus metrics, served from the engine-core process (where the scheduler runs).

vLLM 0.32's /metrics lives in the API-server process; its `vllm.stat_logger_plugins` loggers
run there too and receive only vLLM's own `SchedulerStats`/`IterationStats`, which have no field
for a plugin's data. So with ``metrics_port`` set, dcpp serves its own small endpoint next to
vLLM's (scrape both). Without it nothing here runs and the log carries the same numbers.

Metric names follow Prometheus conventions (base units: seconds, tokens, ratios).
"""

from __future__ import annotations

import logging

from dcpp import envs

logger = logging.getLogger("vllm.dcpp")

CHUNK_BUCKETS = tuple(float(2 ** k) for k in range(4, 19))  # 16 .. 262144 tokens
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # |predicted / measured - 1|
BUBBLE_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Measured share of stage-time idle during a prefill (`dcpp.online.bubbles`)."""


class DcppMetrics:
    """A private registry (never vLLM's global one: an in-process engine shares that) and the
    HTTP server that exposes it. `close` stops the server and frees the port."""

    def __init__(self, port: int, host: str | None = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.chunk_tokens = Histogram(
            "dcpp_prefill_chunk_tokens", "Prefill chunk sizes scheduled (tokens).",
            buckets=CHUNK_BUCKETS, registry=r)
        self.prediction_error = Histogram(
            "dcpp_chunk_latency_prediction_error",
            "Per prefill step: |predicted / measured - 1| of the slowest stage's compute time.",
            buckets=ERROR_BUCKETS, registry=r)
        self.bubble_fraction = Histogram(
            "dcpp_prefill_bubble_fraction",
            "Per measured prefill: share of stage-time idle between its first chunk's start on "
            "stage 0 and its last chunk's end on the last stage, averaged over pipeline stages "
            "(from the workers' step start/end times; prefills with an untimed step in that "
            "window are not observed). Label plan: off (vLLM's chunks), pipeline, equal_time, "
            "static, fixed (dcpp_chunk_size), unknown (begun before timing started).",
            labelnames=("plan",), buckets=BUBBLE_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "dcpp_step_compute_seconds", "Slowest stage's compute time of each prefill step.",
            registry=r)
        self.overhead = Gauge("dcpp_step_overhead_seconds",
                              "Learnt per-step engine overhead beyond the slowest stage's compute.",
                              registry=r)
        self.scale = Gauge("dcpp_latency_model_scale",
                           "Online calibration factor applied to the base model (the start-up "
                           "profile or its latest refit).",
                           registry=r)
        self.profile_passes = Gauge("dcpp_profile_passes",
                                    "Profiling passes run at start-up (0: loaded from cache).",
                                    registry=r)
        self.active = Gauge("dcpp_dynamic_chunking_active",
                            "1 when chunks are sized by dcpp, 0 after a fallback to static.",
                            registry=r)
        self.host = host or envs.metrics_host()  # DCPP_METRICS_HOST, default 127.0.0.1
        self.port = int(port)
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=r)
        logger.info("dcpp: Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


def bubble_totals(text: str) -> dict[str, tuple[float, int]]:
    """{plan: (sum, count)} of ``dcpp_prefill_bubble_fraction`` in a scrape of the endpoint
    (Prometheus text format). For benchmarks on the OpenAI server: the difference of two scrapes
    gives a round's mean measured bubble per plan, (sum1 - sum0) / (count1 - count0)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "dcpp_prefill_bubble_fraction":
            continue
        for sample in family.samples:
            plan = sample.labels.get("plan", "")
            if sample.name.endswith("_sum"):
                out.setdefault(plan, [0.0, 0])[0] = float(sample.value)
            elif sample.name.endswith("_count"):
                out.setdefault(plan, [0.0, 0])[1] = int(sample.value)
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def start_metrics(port: int, rank: int = 0) -> DcppMetrics | None:
    """The metrics endpoint on ``port + rank``, or None (with a warning: serving goes on without
    it) when the port cannot be bound."""
    if port <= 0:
        return None
    try:
        return DcppMetrics(port + rank)
    except OSError as exc:
        logger.warning("dcpp: cannot serve metrics on port %d (%s); set profiling_chunk_config."
                       "metrics_port to a free port. Continuing without metrics.", port + rank, exc)
        return None

