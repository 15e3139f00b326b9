"""Serving under load: vLLM's OpenAI server (CPU build, PP=2, prefix caching on, dcpp enabled)
driven by concurrent streaming clients; vLLM's own chunking vs dcpp's plans vs fixed chunk
sizes, all inside ONE server, beside vLLM's own knob (`--long-prefill-token-threshold N`, a
server per N, dcpp off).

Each request to the dcpp server picks its chunking in the request body: ``"vllm_xargs":
{"dcpp_plan": "off" | "pipeline" | "equal_time"}`` ("off" is vLLM's own chunking: every step's
whole token budget) or ``{"dcpp_chunk_size": N}`` (fixed chunks of N tokens, a per-request
cap). vLLM's server-level cap needs a server of its own: mode ``lpt-N`` is a plain vLLM server
(no dcpp) started with ``--long-prefill-token-threshold N`` (``lpt-0``: a plain server with no
threshold, to see how far two server instances differ on their own).

Rounds: in every round each server (in an order that rotates and reverses from round to
round, as the modes do) runs every workload, and for each workload each of its modes runs the
round's requests once, alone on the server (the next mode starts when the last request is
done), in an order that rotates and reverses from round to round (A B C, C B A, B C A, A C B,
...). Within a round every mode gets the same prompts (same lengths, same tokens), each under
its own `cache_salt`, so no mode hits another's prefix cache; every round draws fresh tokens.
Shared prefixes (prefix-c4) are part of the workload, inside one mode's run. Paired ratios are
per round (mode / the same round's reference), median over rounds, with a 90% bootstrap
interval (benchmarks/bench_stats.py, as vllm_ttft.py); the threshold servers' ratios to the
dcpp server's "off" mode are paired the same way, across two server instances.

Servers stay up between their turns as far as memory allows (an idle vLLM server sleeps; the
estimate per server is its measured process memory plus its KV cache, `--max-servers` caps
the count); when a server must start and no room is left, the one used longest ago is
stopped, and started again (with a fresh warm-up) at its next turn.

Metrics (vLLM's `vllm bench serve` definitions, measured by dcpp.tooling.load_client):
TTFT = time to the first streamed token, ITL = gaps between later tokens, input throughput =
prompt tokens (cached ones included) / wall time of the round, requests/s likewise.

Workloads (seeded; lengths in tokens of the tiny model's 512-token vocabulary):
  single-long  concurrency 1, one 16384-token prompt per round, 8 output tokens
  varlen-c4    concurrency 4, 8 prompts, lengths log-uniform 1024-16384, 8 output tokens
  prefix-c4    concurrency 4, 4 conversations x 4 turns over one shared 8192-token prefix;
               each turn adds 128-1024 new tokens to the conversation so far (its earlier
               turns and answers), answers 16-32 tokens: most prompt tokens hit the cache
  mixed-c16    16 clients: 4 long prompts (4096-16384, 8 output tokens) beside 12 chat
               requests (128-1024 prompt tokens, 64-128 output tokens)
  hol          head-of-line: one 16384-token prompt (8 output tokens), and 8 short requests
               (128-512 tokens, 16-32 output tokens) sent while it prefills, evenly over 5-80%
               of its TTFT alone. Per mode and round, three runs: the long prompt alone, the
               short requests alone (same arrival times, idle server), then both. Reported:
               short TTFT p99 / its idle value (target <= 2) and long TTFT / alone (target
               <= 1.05), each mode against its own idle runs of the same round
  vllm-random  vLLM's own client, `vllm bench serve --dataset-name random` (8 prompts of
               600-11400 tokens, 8 output tokens, concurrency 4), through
               `python -m dcpp.integration.vllm.launch bench serve`; the servers then load a
               word-level tokenizer (`harness.word_tokenizer`) instead of
               `--skip-tokenizer-init`. Only on the dcpp server, modes "off" and "pipeline"
               (`--extra-body '{"vllm_xargs": {...}}'`)
The issue's 16k single prompt is kept as is; the seed's 4k-64k varlen is scaled to 1k-16k.

    flock /tmp/dcpp-vllm.lock .venv/bin/python benchmarks/serve_load.py          # ~60 min
    flock /tmp/dcpp-vllm.lock .venv/bin/python benchmarks/serve_load.py --thresholds none \\
        --workloads single-long,varlen-c4,prefix-c4,mixed-c16                   # ~16 min
    flock /tmp/dcpp-vllm.lock .venv/bin/python benchmarks/serve_load.py --quick  # ~5 min
    # vLLM's own client only, dcpp default vs dcpp_plan off, paired over 5 rounds:
    flock /tmp/dcpp-vllm.lock .venv/bin/python benchmarks/serve_load.py \\
        --workloads vllm-random --thresholds none

The default set: 5 rounds of 7 modes on the dcpp server (vLLM's, dcpp default, equal-time,
fixed 256 / 512 / 1024 / 2048; a fixed 4096 would be vLLM's own chunking at the default
budget of 4096) and 4 threshold servers (256, 512, 1024, 2048), after one untimed warm-up
round per workload and server start (dcpp's default mode on the dcpp server). The best fixed
chunk (and the best threshold) of a workload is the one with the best paired median of its
primary metric (TTFT p50 for single-long, short-request TTFT p99 for hol, input throughput
for the others); picking the best of four on the same rounds favours the fixed baseline a
little (the winner's curse), which makes dcpp's ratio to it conservative.

``--quick`` (smaller prompts, one round, one fixed chunk, one threshold server) checks only
that every request completes and that greedy outputs are identical across modes and servers;
its timings mean nothing. Exit status 0 only when both hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
# 1 GiB of KV cache per worker holds ~450k tokens of the 6-layer hidden-192 model, 5x what
# the largest workload keeps in flight; less memory per server lets more of them stay up.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Best of 3 per profiling pass (as vllm_ttft.py): single passes on shared CPUs carry outliers.
os.environ.setdefault("DCPP_PROFILE_REPEATS", "3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve_report import (  # noqa: E402
    REFERENCE,
    headline,
    label,
    plot,
    print_headline,
    print_workload,
    summarise,
)
from serve_workloads import (  # noqa: E402
    QUICK,
    WORKLOADS,
    Scale,
    build_sessions,
    max_prompt_len,
)

from serve_rounds import run_hol, run_round, run_vllm_client  # noqa: E402
from serve_servers import (  # noqa: E402
    ServerFailed,
    ServerPool,
    ServerSpec,
    round_order,
    server_specs,
)

from dcpp.tooling import harness, load_client  # noqa: E402



# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    return [int(c) for c in text.split(",") if c.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke: small prompts, 1 round, one fixed chunk, one threshold server")
    ap.add_argument("--rounds", type=int, help="rounds per workload (default 5; quick 1)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--chunks", help="fixed chunk sizes to sweep, comma-separated "
                                     "(default 256,512,1024,2048; quick 512)")
    ap.add_argument("--thresholds",
                    help="--long-prefill-token-threshold values, a plain vLLM server (dcpp "
                         "off) per value, comma-separated; 0 = a plain server without one; "
                         "'none' = no such server (default 256,512,1024,2048; quick 512)")
    ap.add_argument("--max-servers", type=int, default=8,
                    help="servers kept up at once, memory permitting (default 8)")
    ap.add_argument("--no-dcpp-modes", action="store_true",
                    help="only vLLM's and the fixed chunks (no pipeline / equal_time)")
    ap.add_argument("--budget", type=int, default=4096,
                    help="max_num_batched_tokens (default: vLLM 0.32's own default for "
                         "`vllm serve` on CPU with PP=2, 2048 x world size)")
    ap.add_argument("--min-chunk", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed warm-up round (every workload, at each server "
                         "start; dcpp default on the dcpp server)")
    ap.add_argument("--out-dir", default="out/serve_load",
                    help="model, server logs, JSON and picture (default out/serve_load)")
    ap.add_argument("--json", help="results (default <out-dir>/serve_load[_quick].json)")
    ap.add_argument("--plot", help="picture (default <out-dir>/serve_load[_quick].png)")
    ap.add_argument("--cache-dir", help="dcpp profile cache (default: a fresh tmp dir, so the "
                                        "server profiles at start-up)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    args.scale = QUICK if args.quick else Scale()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.chunks is None:
        args.chunks = "512" if args.quick else "256,512,1024,2048"
    args.chunks = _ints(args.chunks)
    bad = [c for c in args.chunks if not 1 <= c <= args.budget]
    if bad:
        ap.error(f"--chunks {bad} outside 1..--budget {args.budget} (a fixed chunk is at most "
                 f"what vLLM offers a request in a step)")
    if args.thresholds is None:
        args.thresholds = "512" if args.quick else "256,512,1024,2048"
    args.thresholds = list(dict.fromkeys(_ints(args.thresholds)))
    if any(n < 0 for n in args.thresholds):
        ap.error(f"--thresholds {args.thresholds}: each at least 0")
    if args.max_servers < 1:
        ap.error("--max-servers: at least 1")
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    return args


def _sigterm(*_):
    raise SystemExit(143)


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _sigterm)  # so the servers' trees are stopped
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "serve_load_quick" if args.quick else "serve_load"
    json_path = Path(args.json or out_dir / f"{stem}.json")
    plot_path = Path(args.plot or out_dir / f"{stem}.png")
    scale = args.scale
    max_model_len = max_prompt_len(scale) + 256
    model = str(harness.tiny_llama(out_dir / f"model-{args.layers}x{args.hidden}-{max_model_len}",
                                   layers=args.layers, hidden=args.hidden, max_len=max_model_len))
    wls = {name: WORKLOADS[name] for name in args.workloads}
    tokenizer = any(wl.kind == "vllm-client" for wl in wls.values())
    if tokenizer:
        harness.word_tokenizer(model)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="dcpp_serve_load_")
    env = dict(os.environ, DCPP_CACHE_DIR=str(cache_dir))
    specs = server_specs(args)
    modes_of = {name: [m for spec in specs for m in spec.workload_modes(wl)]
                for name, wl in wls.items()}
    all_modes = [m for spec in specs for m in spec.modes]
    client_dir = out_dir / f"{stem}_vllm_client"

    def one(server: load_client.Server, name: str, r: int, mode: str, tag: str) -> dict:
        wl = wls[name]
        seed = hash_seed(args.seed, name, r)
        salt = f"{tag}-{name}-{mode}"
        if wl.kind == "vllm-client":
            return run_vllm_client(server.base, model, scale, wl, mode, salt,
                                   seed % (1 << 31), client_dir)
        sessions = build_sessions(name, scale, seed=seed)
        if wl.kind == "hol":
            return asyncio.run(run_hol(server.base, model, sessions, scale, mode, salt))
        return asyncio.run(run_round(server.base, model, sessions, wl.concurrency, mode, salt))

    warm: dict[str, list] = {}

    def warm_up(spec: ServerSpec, server: load_client.Server) -> None:
        if args.no_warmup or args.quick:
            return
        mode = "pipeline" if "pipeline" in spec.modes else spec.modes[0]
        k = len(warm.setdefault(spec.name, []))
        for name, wl in wls.items():
            if wl.kind == "vllm-client" or not spec.workload_modes(wl):
                continue  # the client's own start-up is all a warm-up would add
            t0 = time.perf_counter()
            res = one(server, name, -1 - k, mode, f"warm{k}-{spec.name}")
            warm[spec.name].append({"workload": name, "wall_s": res["wall_s"],
                                    "completed": res["completed"]})
            print(f"warm-up {spec.name} {name}: {res['completed']}/{res['requests']} requests "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)

    t_all = time.perf_counter()
    load_at_start = os.getloadavg()
    pool = ServerPool(model=model, args=args, out_dir=out_dir, stem=stem, env=env,
                      max_model_len=max_model_len, tokenizer=tokenizer, on_start=warm_up)
    rounds: dict[str, list[dict]] = {w: [{} for _ in range(args.rounds)] for w in wls}
    try:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for spec in round_order(specs, r):
                if not any(spec.workload_modes(wl) for wl in wls.values()):
                    continue
                server = pool.get(spec)
                for name, wl in wls.items():
                    t1 = time.perf_counter()
                    done = round_order(spec.workload_modes(wl), r)
                    for mode in done:
                        rounds[name][r][mode] = one(server, name, r, mode, f"r{r}")
                    if done:
                        print(f"  round {r + 1} {spec.name} {name} "
                              f"({time.perf_counter() - t1:.0f} s): " + ", ".join(
                                  f"{m} {rounds[name][r][m]['completed']}/"
                                  f"{rounds[name][r][m]['requests']}" for m in done),
                              flush=True)
            for name in wls:
                rd = rounds[name][r]
                print(f"round {r + 1}/{args.rounds} {name}: "
                      + ", ".join(f"{m} {rd[m]['input_tput']:.0f} tok/s "
                                  f"{rd[m]['ttft_p50']:.2f}s" for m in modes_of[name]),
                      flush=True)
            print(f"round {r + 1} took {time.perf_counter() - t0:.0f} s", flush=True)
    except ServerFailed as e:
        print(str(e), file=sys.stderr)
        return 2
    finally:
        pool.stop_all()
    total_s = time.perf_counter() - t_all

    summary = {name: summarise(rounds[name], modes_of[name], wls[name]) for name in wls}
    for name in wls:
        print_workload(name, summary[name], modes_of[name], args.rounds)
    rows = headline(summary)
    if not args.quick:
        print_headline(rows)
    identical = all(s["greedy_identical"] for s in summary.values())
    completed = all(s["all_completed"] for s in summary.values())
    startups = {n: [s["startup_s"] for s in v] for n, v in pool.starts.items()}
    print(f"\nevery request completed: {completed}; greedy outputs identical across modes "
          f"in every workload: {identical}; total {total_s:.0f} s (server start-ups "
          + ", ".join(f"{n} " + "/".join(f"{x:.0f}" for x in v) for n, v in startups.items())
          + " s); load average (1/5/15 min) at start "
          + "/".join(f"{x:.1f}" for x in load_at_start) + ", at end "
          + "/".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs")

    result = {
        "quick": args.quick, "rounds": args.rounds, "modes": all_modes, "reference": REFERENCE,
        "servers": [{"name": s.name, "modes": s.modes, "dcpp_config": s.dcpp,
                     "extra_flags": s.extra, "starts": pool.starts.get(s.name, [])}
                    for s in specs],
        "workloads": {n: asdict(wl) for n, wl in wls.items()},
        "modes_per_workload": modes_of, "labels": {m: label(m) for m in all_modes},
        "scale": asdict(scale), "seed": args.seed, "budget": args.budget,
        "min_chunk": args.min_chunk, "layers": args.layers, "hidden": args.hidden,
        "max_model_len": max_model_len, "tokenizer": tokenizer,
        "server_cmd": (pool.starts.get("dcpp") or [{}])[0].get("cmd"),
        "dcpp_config": specs[0].dcpp, "startup_s": startups, "total_s": total_s,
        "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "machine": dict(machine(), load_avg_at_start=load_at_start), "git": git_state(),
        "all_completed": completed, "greedy_identical": identical,
        "headline": rows, "summary": summary, "warmup": warm,
        # Per round and mode, without the outputs (checked above) to keep the file small.
        "per_round": {n: [{m: {k: v for k, v in res.items() if k != "outputs"}
                        for m, res in rd.items()} for rd in rs] for n, rs in rounds.items()},
    }
    json_path.write_text(json.dumps(result, indent=1))
    plot(summary, all_modes, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0 if (identical and completed) else 1


def hash_seed(seed: int, name: str, r: int) -> int:
    """A seed per (run seed, workload, round), stable across Python processes."""
    import zlib

    return zlib.crc32(f"{seed}:{name}:{r}".encode())


def git_state() -> dict:
    """The commit measured, and the files that differed from it (a shared working tree)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"head": git("rev-parse", "HEAD"),
            "modified": [ln[3:] for ln in git("status", "--porcelain").splitlines()]}


def machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or _cpu_model(),
            "load_avg_at_end": os.getloadavg()}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
