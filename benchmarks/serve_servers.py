"""The servers and modes of `serve_load.py`: the dcpp server (its modes are request options)
and one plain vLLM server per `--long-prefill-token-threshold` value; `ServerPool` keeps them up
while memory allows."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve_report import REFERENCE
from serve_workloads import Workload

from dcpp.tooling import harness, load_client

THRESHOLD = "lpt-"
"""Mode prefix of a `--long-prefill-token-threshold` server (dcpp off)."""
DCPP_ON = "dcpp: dynamic chunked prefill on"


# --------------------------------------------------------------------------- modes


def mode_xargs(mode: str) -> dict | None:
    """The request's ``vllm_xargs`` (None: a threshold server's mode, plain vLLM)."""
    if mode.startswith(THRESHOLD):
        return None
    if mode.startswith("fixed-"):
        return {"dcpp_chunk_size": int(mode.split("-", 1)[1])}
    return {"dcpp_plan": mode}


def round_order(modes: list, r: int) -> list:
    """Pairs of rounds run one order forward, then backward (A B C, C B A), so that a linear
    drift within the pair hits every mode alike; each pair starts one mode later (B C A, A C B,
    ...)."""
    if not modes:
        return []
    k = (r // 2) % len(modes)
    order = modes[k:] + modes[:k]
    return order[::-1] if r % 2 else order


# --------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    """One server of the run and the modes it serves."""

    name: str
    """"dcpp", or the threshold mode ("lpt-512")."""
    modes: list[str]
    dcpp: dict | None
    extra: list[str] = field(default_factory=list)

    @property
    def is_dcpp(self) -> bool:
        return self.dcpp is not None

    def workload_modes(self, wl: Workload) -> list[str]:
        if not self.is_dcpp:
            return list(self.modes) if wl.threshold_servers else []
        if wl.dcpp_modes is None:
            return list(self.modes)
        return [m for m in self.modes if m in wl.dcpp_modes]


def server_specs(args) -> list[ServerSpec]:
    modes = [REFERENCE] + ([] if args.no_dcpp_modes else ["pipeline", "equal_time"])
    modes += [f"fixed-{c}" for c in args.chunks]
    specs = [ServerSpec("dcpp", modes, {"enabled": True, "min_chunk": args.min_chunk})]
    for n in args.thresholds:
        specs.append(ServerSpec(f"{THRESHOLD}{n}", [f"{THRESHOLD}{n}"], None,
                                ["--long-prefill-token-threshold", str(n)] if n else []))
    return specs


class ServerFailed(RuntimeError):
    pass


class ServerPool:
    """The run's servers, started at their first turn and kept up while memory allows.

    Before a start, servers are stopped (the one used longest ago first) while the count
    reaches ``max_servers`` or the machine's available memory is below the estimate of one
    more server plus ``reserve`` bytes; the estimate is the largest seen so far (unique
    memory of a server's processes once healthy, plus its KV cache space)."""

    def __init__(self, *, model: str, args, out_dir: Path, stem: str, env: dict,
                 max_model_len: int, tokenizer: bool, on_start) -> None:
        self.model, self.args, self.out_dir, self.stem = model, args, out_dir, stem
        self.env, self.max_model_len, self.tokenizer = env, max_model_len, tokenizer
        self.on_start = on_start
        self.live: dict[str, load_client.Server] = {}
        self.last_used: dict[str, float] = {}
        self.starts: dict[str, list[dict]] = {}
        self.estimate = 0
        self.reserve = 2 << 30

    def command(self, spec: ServerSpec) -> list[str]:
        return load_client.server_command(
            self.model, port=harness.free_port(), budget=self.args.budget,
            max_model_len=self.max_model_len, dcpp=spec.dcpp, tokenizer=self.tokenizer,
            extra=spec.extra)

    def get(self, spec: ServerSpec) -> load_client.Server:
        self.last_used[spec.name] = time.monotonic()
        if spec.name in self.live:
            return self.live[spec.name]
        self._make_room()
        n = len(self.starts.setdefault(spec.name, []))
        suffix = ("" if spec.is_dcpp else f"_{spec.name}") + (f".start{n + 1}" if n else "")
        log_path = self.out_dir / f"{self.stem}_server{suffix}.log"
        cmd = self.command(spec)
        print(f"server {spec.name}: {' '.join(cmd[1:])}\nlog: {log_path}", flush=True)
        server = load_client.Server(cmd, log_path=log_path, env=self.env)
        self.live[spec.name] = server
        startup_s = server.wait_healthy(self.args.startup_timeout)
        dcpp_on = DCPP_ON in server.log_tail(200_000)
        print(f"server {spec.name} healthy after {startup_s:.0f} s (dcpp on: {dcpp_on}); "
              f"{len(self.live)} up", flush=True)
        if dcpp_on != spec.is_dcpp:
            raise ServerFailed(f"server {spec.name}: dcpp {'in' if dcpp_on else ''}active, "
                               f"expected {'on' if spec.is_dcpp else 'off'}; see {log_path}")
        self.estimate = max(self.estimate, self._memory(server))
        self.starts[spec.name].append({"startup_s": startup_s, "log": str(log_path),
                                       "cmd": cmd[1:], "memory_estimate": self.estimate})
        self.on_start(spec, server)
        return server

    def _memory(self, server: load_client.Server) -> int:
        import psutil

        total = 0
        for p in server.processes():
            try:
                total += p.memory_full_info().uss
            except psutil.Error:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")) * (1 << 30)
        return int(total + 2 * kv)  # PP = 2 workers

    def _make_room(self) -> None:
        import psutil

        while self.live:
            full = len(self.live) >= self.args.max_servers
            short = psutil.virtual_memory().available < self.estimate + self.reserve
            if not (full or short):
                return
            victim = min(self.live, key=lambda n: self.last_used.get(n, 0.0))
            print(f"stopping server {victim} ({'--max-servers' if full else 'memory'})",
                  flush=True)
            self.stop(victim)

    def stop(self, name: str) -> None:
        server = self.live.pop(name)
        killed = server.stop()
        if killed:
            print(f"killed {name} server processes that outlived SIGINT: {killed}",
                  file=sys.stderr)

    def stop_all(self) -> None:
        for name in list(self.live):
            self.stop(name)
