"""One round of `serve_load.py` against one server: streamed requests per session, the
head-of-line passes, vLLM's own client, and the metrics of a round."""

from __future__ import annotations

import time
from pathlib import Path

from serve_report import percentile
from serve_servers import mode_xargs
from serve_workloads import Scale, Session, Workload, hol_arrivals

from dcpp.tooling import load_client



# --------------------------------------------------------------------------- one round


def request_body(model: str, prompt: list[int], max_tokens: int, mode: str,
                 salt: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "cache_salt": salt}
    xargs = mode_xargs(mode)
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return body


def round_metrics(mode: str, wall: float, sessions: list[Session],
                  results: dict[tuple[int, int], load_client.RequestResult]) -> dict:
    """Round metrics of ``sessions`` run under ``mode``; ``results[(session, turn)]``."""
    expected = {(i, k): t.max_tokens for i, s in enumerate(sessions)
                for k, t in enumerate(s.turns)}
    done = [key for key, res in results.items()
            if res.ok and len(res.output_ids) == expected[key]]
    failed = {f"{i}.{k}": (results[(i, k)].error if (i, k) in results else "not sent")
              for (i, k) in expected if (i, k) not in done}
    ok = [results[key] for key in done]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    kinds = {}
    for key in done:
        kind = sessions[key[0]].kind
        d = kinds.setdefault(kind, {"ttft": [], "itl": []})
        d["ttft"].append(results[key].ttft)
        d["itl"] += results[key].itl
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "mode": mode, "wall_s": wall, "requests": len(expected), "completed": len(done),
        "failed": failed,
        "prompt_tokens": prompt_tokens, "cached_tokens": sum(r.cached_tokens for r in ok),
        "output_tokens": sum(len(r.output_ids) for r in ok),
        "input_tput": prompt_tokens / wall, "req_s": len(done) / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "ttft": ttft, "itl": itl,
        "by_kind": {k: {"ttft_p50": percentile(v["ttft"], 50),
                        "ttft_p99": percentile(v["ttft"], 99),
                        "itl_p50": percentile(v["itl"], 50),
                        "itl_p99": percentile(v["itl"], 99)} for k, v in kinds.items()},
        "outputs": {f"{i}.{k}": results[(i, k)].output_ids for (i, k) in done},
    }


async def run_round(base: str, model: str, sessions: list[Session], concurrency: int,
                    mode: str, salt: str) -> dict:
    """Every session of the round under ``mode``: per-request results and round metrics."""
    import aiohttp

    url = base + "/v1/completions"
    results: dict[tuple[int, int], load_client.RequestResult] = {}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def run_one(s: Session, i: int) -> None:
            history = list(s.prefix)
            for k, t in enumerate(s.turns):
                prompt = history + t.user
                res = await load_client.stream_completion(
                    http, url, request_body(model, prompt, t.max_tokens, mode, salt))
                results[(i, k)] = res
                if not res.ok:
                    return
                history = prompt + res.output_ids

        wall = await load_client.run_sessions(sessions, concurrency, run_one)
    return round_metrics(mode, wall, sessions, results)


async def run_hol(base: str, model: str, sessions: list[Session], scale: Scale, mode: str,
                  salt: str) -> dict:
    """The head-of-line workload under ``mode``: the long prompt (``sessions[0]``) alone,
    the short requests alone at their arrival times (an idle server), then the long prompt
    with the short ones arriving while it prefills. Each run under its own cache salt. The
    result is the last run's `round_metrics`, with the idle references beside it."""
    import aiohttp

    url = base + "/v1/completions"
    long, shorts = sessions[0], sessions[1:]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        def runner(results: dict, tag: str, base_index: int = 0):
            async def run_one(s: Session, i: int) -> None:
                t = s.turns[0]
                results[(i + base_index, 0)] = await load_client.stream_completion(
                    http, url, request_body(model, t.user, t.max_tokens, mode,
                                            f"{salt}-{tag}"))
            return run_one

        alone: dict = {}
        await runner(alone, "alone")(long, 0)
        alone_ttft = alone[(0, 0)].ttft if alone[(0, 0)].ok else float("nan")
        offsets = hol_arrivals(scale, alone_ttft if alone_ttft == alone_ttft else 1.0)
        idle: dict = {}
        # Indices 1.. as in the hol run, so that both are keyed alike.
        await load_client.run_arrivals(shorts, offsets, runner(idle, "idle", base_index=1))
        hol: dict = {}
        wall = await load_client.run_arrivals(sessions, [0.0] + offsets, runner(hol, "hol"))

    out = round_metrics(mode, wall, sessions, hol)
    ref_alone = round_metrics(mode, 1.0, [long], alone)
    ref_idle = round_metrics(mode, 1.0, [Session("pad", [])] + shorts, idle)
    out["failed"].update({f"alone.{k}": v for k, v in ref_alone["failed"].items()})
    out["failed"].update({f"idle.{k}": v for k, v in ref_idle["failed"].items()})
    out["outputs"].update({f"alone.{k}": v for k, v in ref_alone["outputs"].items()})
    out["outputs"].update({f"idle.{k}": v for k, v in ref_idle["outputs"].items()})
    short_ttft = [hol[(i, 0)].ttft for i in range(1, len(sessions))
                  if (i, 0) in hol and hol[(i, 0)].ok]
    idle_ttft = [r.ttft for r in idle.values() if r.ok]
    long_ttft = hol[(0, 0)].ttft if (0, 0) in hol and hol[(0, 0)].ok else float("nan")
    out.update({
        "arrivals_s": offsets,
        "short_ttft_p50": percentile(short_ttft, 50), "short_ttft_p99": percentile(short_ttft, 99),
        "short_idle_ttft_p50": percentile(idle_ttft, 50),
        "short_idle_ttft_p99": percentile(idle_ttft, 99),
        "long_ttft": long_ttft, "long_alone_ttft": alone_ttft,
    })
    out["short_vs_idle"] = out["short_ttft_p99"] / out["short_idle_ttft_p99"]
    out["long_vs_alone"] = long_ttft / alone_ttft
    return out


def run_vllm_client(base: str, model: str, scale: Scale, wl: Workload, mode: str, salt: str,
                    seed: int, out_dir: Path) -> dict:
    """One run of vLLM's own client (`vllm bench serve`, random dataset) under ``mode``, as
    `round_metrics` reports a round (outputs are the generated texts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"cache_salt": salt}
    xargs = mode_xargs(mode)
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    name = f"{salt}.json"
    cmd = load_client.bench_serve_command(
        base, model, input_len=scale.rand_input_len, output_len=scale.rand_output,
        input_range_ratio=scale.rand_range, num_prompts=scale.rand_prompts,
        concurrency=wl.concurrency, seed=seed, result_dir=out_dir, result_filename=name,
        extra_body=extra)
    t0 = time.perf_counter()
    j = load_client.run_bench_serve(cmd, log_path=out_dir / f"{salt}.log")
    client_s = time.perf_counter() - t0
    n = scale.rand_prompts
    errors = list(j.get("errors") or [""] * n)
    out_lens = list(j.get("output_lens") or [0] * n)
    done = [i for i in range(n) if not errors[i] and out_lens[i] == scale.rand_output]
    ttft = [j["ttfts"][i] for i in done]
    itl = [x for i in done for x in j["itls"][i]]
    wall = float(j["duration"])
    prompt_tokens = sum(j["input_lens"][i] for i in done)
    return {
        "mode": mode, "wall_s": wall, "requests": n, "completed": len(done),
        "failed": {str(i): errors[i] or f"{out_lens[i]} output tokens" for i in range(n)
                   if i not in done},
        "prompt_tokens": prompt_tokens, "cached_tokens": 0,
        "output_tokens": sum(out_lens[i] for i in done),
        "input_tput": prompt_tokens / wall, "req_s": len(done) / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "ttft": ttft, "itl": itl, "by_kind": {},
        "client": {"seconds": client_s, "cmd": cmd[1:],
                   "vllm_input_tput": j["total_input_tokens"] / wall,
                   "median_ttft_ms": j.get("median_ttft_ms"),
                   "p99_ttft_ms": j.get("p99_ttft_ms"),
                   "p99_itl_ms": j.get("p99_itl_ms")},
        "outputs": {str(i): j["generated_texts"][i] for i in done},
    }
