"""A prefill/decode pair on one machine: P (PP=2, dcpp on), D (PP=1) and the PD proxy.

Real processes over loopback, as a user starts them with the CPU build:

- D: vLLM's OpenAI server, ``NixlPushConnector`` with ``kv_role: kv_consumer``, PP=1;
- P: the same server with ``kv_role: kv_producer``, PP=2, dcpp on (``--additional-config``);
- the proxy (`dcpp.integration.vllm.pd_proxy`) in front of both.

Why push: vLLM 0.32's pull connector (``NixlConnector``) cannot serve a PP=2 producer to a
PP=1 consumer: D's handshake compares its own KV layer count with the producer's per-rank
count and fails ("Number of KV layers must match between prefill and decode", which kills
D's engine), measured here; the push connector writes each of P's PP ranks into D's blocks
(D waits for ``pp_size`` notifications). Each server gets its own NIXL side-channel port
(``VLLM_NIXL_SIDE_CHANNEL_PORT``); UCX runs over TCP, shared memory and self on loopback;
NIXL's agents run without their progress thread (``DCPP_NIXL_PROGRESS_THREAD=0``, unless the
caller's environment sets it).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcpp.tooling import load_client
from dcpp.tooling.harness import free_port

CONNECTOR = "NixlPushConnector"
UCX_TLS = "tcp,self,sm"


def metric_sum(base: str, name: str, timeout_s: float = 10.0) -> float:
    """Sum over all label sets of the Prometheus sample ``name`` (e.g.
    ``vllm:nixl_xfer_time_seconds_sum``) on the vLLM server at ``base``; 0 if absent."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


def kv_transfer_flags(role: str, *, connector: str = CONNECTOR,
                      extra_config: dict | None = None) -> list[str]:
    """``--kv-transfer-config`` for ``role`` (``kv_producer`` on P, ``kv_consumer`` on D),
    KV in host memory (the CPU build's only NIXL memory)."""
    cfg: dict[str, Any] = {"kv_connector": connector, "kv_role": role,
                           "kv_buffer_device": "cpu"}
    if extra_config:
        cfg["kv_connector_extra_config"] = extra_config
    return ["--kv-transfer-config", json.dumps(cfg)]


def server_env(*, side_channel_port: int, cores: str, base: dict | None = None) -> dict:
    """Environment of one server of the pair: its NIXL side channel, its cores."""
    env = dict(os.environ if base is None else base)
    env.update(VLLM_NIXL_SIDE_CHANNEL_PORT=str(side_channel_port),
               VLLM_CPU_OMP_THREADS_BIND=cores, UCX_TLS=env.get("UCX_TLS", UCX_TLS))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # NIXL's progress thread polls without pause; three agents (P's two ranks, D) on the cores
    # the model runs on made P about 3x slower here. vLLM's connector drives the transfers.
    env.setdefault("DCPP_NIXL_PROGRESS_THREAD", "0")
    return env


@dataclass
class PairConfig:
    model: str
    budget: int = 2048
    max_model_len: int = 16384
    dcpp: dict | None = field(default_factory=lambda: {"enabled": True})
    """P's ``profiling_chunk_config`` (None: dcpp off on P)."""
    prefill_pp: int = 2
    prefill_cores: str = "0|1"
    decode_cores: str = "1"
    kv_extra_config: dict | None = None
    startup_timeout_s: float = 900.0


class PDPair:
    """D, then P, then the proxy; ``stop()`` (also on ``with`` exit) stops all three and
    returns the PIDs it had to kill. ``client`` is the proxy's base URL."""

    def __init__(self, cfg: PairConfig, *, log_dir: str | Path) -> None:
        self.cfg = cfg
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.decode: load_client.Server | None = None
        self.prefill: load_client.Server | None = None
        self.proxy: load_client.Server | None = None
        self.startup_s: dict[str, float] = {}

    def _server(self, name: str, *, pp: int, role: str, dcpp: dict | None, cores: str,
                side_channel_port: int) -> load_client.Server:
        cfg = self.cfg
        cmd = load_client.server_command(
            cfg.model, port=free_port(), budget=cfg.budget, max_model_len=cfg.max_model_len,
            dcpp=dcpp, pipeline_parallel_size=pp,
            extra=kv_transfer_flags(role, extra_config=cfg.kv_extra_config))
        env = server_env(side_channel_port=side_channel_port, cores=cores)
        return load_client.Server(cmd, log_path=self.log_dir / f"{name}.log", env=env)

    def start(self) -> "PDPair":
        cfg = self.cfg
        # D first and alone: started together on 2 cores, both crawl through compilation.
        self.decode = self._server("decode", pp=1, role="kv_consumer", dcpp=None,
                                   cores=cfg.decode_cores, side_channel_port=free_port())
        self.startup_s["decode"] = self.decode.wait_healthy(cfg.startup_timeout_s)
        self.prefill = self._server("prefill", pp=cfg.prefill_pp, role="kv_producer",
                                    dcpp=cfg.dcpp, cores=cfg.prefill_cores,
                                    side_channel_port=free_port())
        self.startup_s["prefill"] = self.prefill.wait_healthy(cfg.startup_timeout_s)
        cmd = [sys.executable, "-m", "dcpp.integration.vllm.pd_proxy",
               "--prefill", self.prefill.base, "--decode", self.decode.base,
               "--port", str(free_port())]
        self.proxy = load_client.Server(cmd, log_path=self.log_dir / "proxy.log")
        self.startup_s["proxy"] = self.proxy.wait_healthy(60.0)
        return self

    @property
    def client(self) -> str:
        assert self.proxy is not None, "start() the pair first"
        return self.proxy.base

    def processes(self) -> list[Any]:
        return [p for s in (self.proxy, self.prefill, self.decode) if s is not None
                for p in s.processes()]

    def stop(self) -> list[int]:
        killed: list[int] = []
        for server in (self.proxy, self.prefill, self.decode):
            if server is not None:
                killed += server.stop()
        return killed

    def __enter__(self) -> "PDPair":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()
