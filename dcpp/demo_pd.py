"""`make demo-pd`: dcpp as the prefill node of a PD pair, TTFT at the client including the KV
transfer.

1. Generates the tiny Llama checkpoint locally (as `make demo`).
2. Starts D (PP=1, NIXL push consumer), then P (PP=2, dcpp on, NIXL push producer), then dcpp's
   proxy (`dcpp.tooling.pd_pair`); the client talks to the proxy only.
3. Sends the same long prompt through the pair in each mode, rounds rotating the modes' order,
   every run under its own ``cache_salt`` (no prefix hit anywhere): dcpp's plan on P (default),
   vLLM's static chunks on P (``dcpp_plan: "off"``), and fixed per-request chunks
   (``dcpp_chunk_size``), all inside the one P engine, so that the ratios are free of the
   noise between engine instances.
4. Prints TTFT per mode (best, median, and the median of the per-round ratios to static), the
   NIXL transfers and their time per request (P's and D's counters), and whether the greedy
   tokens equal D's own run of the prompt.

``--concurrency C`` sends C different prompts at once per run (TTFT per request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

XFER_METRICS = ("vllm:nixl_xfer_time_seconds_sum", "vllm:nixl_xfer_time_seconds_count")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m dcpp.demo_pd",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=12288)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--min-chunk", type=int, default=256)
    ap.add_argument("--chunks", default="1024",
                    help="fixed per-request chunk sizes compared (comma list; '' for none)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="out/demo-pd")
    ap.add_argument("--quick", action="store_true",
                    help="reduced size: 4 layers, hidden 128, 4096-token prompt, budget 1024")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt_len, args.layers, args.hidden = 4096, 4, 128
        args.budget, args.min_chunk, args.rounds = 1024, 128, 1
    for name in ("prompt_len", "layers", "hidden", "budget", "min_chunk", "rounds",
                 "concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    try:
        args.chunk_list = [int(c) for c in args.chunks.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--chunks {args.chunks!r}: give chunk sizes as integers, e.g. 512,1024")
    if any(c < 1 for c in args.chunk_list):
        ap.error(f"--chunks {args.chunks!r}: chunk sizes must be >= 1")
    return args


def modes(args) -> dict[str, dict]:
    """Mode name -> the request's ``vllm_xargs`` on P."""
    out = {"dcpp": {}, "static": {"dcpp_plan": "off"}}
    out.update({f"fixed-{c}": {"dcpp_chunk_size": c} for c in args.chunk_list})
    return out


def body(model: str, prompt: list[int], salt: str, xargs: dict) -> dict:
    out = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
           "cache_salt": salt}
    if xargs:
        out["vllm_xargs"] = xargs
    return out


def xfer_counters(pair) -> tuple[float, float]:
    """(seconds, transfers) of NIXL writes so far, P and D together."""
    from dcpp.tooling.pd_pair import metric_sum

    servers = [s for s in (pair.prefill, pair.decode) if s is not None]
    return tuple(sum(metric_sum(s.base, m) for s in servers)  # type: ignore[return-value]
                 for m in XFER_METRICS)


async def one_run(url: str, bodies: list[dict]) -> list:
    import aiohttp

    from dcpp.tooling.load_client import stream_completion

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(stream_completion(session, url, b) for b in bodies))


def main(argv=None) -> int:
    from dcpp.tooling import harness
    from dcpp.tooling.pd_pair import PairConfig, PDPair

    args = parse_args(argv)
    out = Path(args.out)
    max_len = args.prompt_len + 1024
    model = str(harness.tiny_llama(out / f"model-{args.layers}x{args.hidden}-{max_len}",
                                   layers=args.layers, hidden=args.hidden, max_len=max_len))
    prompts = [harness.prompt_tokens(args.prompt_len, seed=s) for s in range(args.concurrency)]
    cfg = PairConfig(model=model, budget=args.budget, max_model_len=max_len,
                     dcpp={"enabled": True, "min_chunk": args.min_chunk})
    print(f"starting D, then P (PP=2, dcpp on), then the proxy; logs in {out}", flush=True)
    with PDPair(cfg, log_dir=out) as pair:
        print("started: " + ", ".join(f"{k} {v:.0f} s" for k, v in pair.startup_s.items()),
              flush=True)
        ref = asyncio.run(one_run(pair.decode.base + "/v1/completions",
                                  [body(model, p, f"ref-{i}", {})
                                   for i, p in enumerate(prompts)]))
        results: dict[str, list[dict]] = {m: [] for m in modes(args)}
        names = list(results)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for mode in order:
                before = xfer_counters(pair)
                runs = asyncio.run(one_run(pair.client + "/v1/completions", [
                    body(model, p, f"{mode}-{r}-{i}", modes(args)[mode])
                    for i, p in enumerate(prompts)]))
                after = xfer_counters(pair)
                failed = [x.error for x in runs if not x.ok]
                if failed:
                    print(f"{mode} round {r}: request failed: {failed[0]}", file=sys.stderr)
                    return 1
                results[mode].append({
                    "ttft": [x.ttft for x in runs],
                    "match": all(x.output_ids == y.output_ids for x, y in zip(runs, ref)),
                    "xfer_s": after[0] - before[0], "xfers": after[1] - before[1]})
                print(f"round {r} {mode:>12}: TTFT "
                      + " ".join(f"{x.ttft:.3f}" for x in runs) + " s", flush=True)
    report(args, results)
    return 0 if all(x["match"] for runs in results.values() for x in runs) else 1


def report(args, results: dict[str, list[dict]]) -> None:
    n = args.concurrency
    print(f"\n== dcpp on the prefill node: {args.prompt_len}-token prompt x {n}, P PP=2 -> "
          f"D PP=1 over NIXL (push), budget {args.budget}, {args.rounds} rounds ==")
    print("TTFT at the client, through the proxy, KV transfer included")
    print(f"{'mode':>12}  {'best s':>7}  {'median s':>8}  {'/static (median of rounds)':>27}"
          f"  {'xfers/req':>9}  {'xfer ms/req':>11}")
    static = [statistics.median(x["ttft"]) for x in results["static"]]
    for mode, runs in results.items():
        per_round = [statistics.median(x["ttft"]) for x in runs]
        ratios = [a / b for a, b in zip(per_round, static)]
        xfers = sum(x["xfers"] for x in runs) / (n * len(runs))
        xfer_ms = 1e3 * sum(x["xfer_s"] for x in runs) / (n * len(runs))
        print(f"{mode:>12}  {min(per_round):7.3f}  {statistics.median(per_round):8.3f}  "
              f"{statistics.median(ratios):14.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
              f"  {xfers:9.1f}  {xfer_ms:11.1f}")
    match = all(x["match"] for runs in results.values() for x in runs)
    print(f"greedy tokens (8) identical to D's own run in every mode: {'yes' if match else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
