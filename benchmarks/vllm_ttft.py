"""TTFT of one long prompt on vLLM (CPU build, PP=2): vLLM's static chunks vs dcpp's default
("pipeline") plan vs the equal-time plan, inside ONE engine.

Each request picks its plan with `SamplingParams(extra_args={"dcpp_plan": ...})` ("off" is
vLLM's own static chunking), so all modes share one engine instance and its noise (on shared
CPUs two identical engines can differ by 20%; DESIGN.md section 3). Runs are interleaved (the
mode order rotates every round) and we report best and median TTFT per mode, the ratios to
static, the greedy-output check, the chunk sequences, the latency-prediction error after
online calibration, and (unless --no-restart) a second start-up that must load the cached
profile and run zero profiling passes.

    .venv/bin/python benchmarks/vllm_ttft.py                      # ~7 min on 2 cores
    .venv/bin/python benchmarks/vllm_ttft.py --prompt-len 12288 --budget 2048

Default model: 6 layers, hidden 192, a 16384-token prompt, budget 4096 (4 static chunks; vLLM's
own default max_num_batched_tokens for `vllm serve` on CPU with PP=2). On
this CPU that is where attention to the prefix dominates the later chunks (DESIGN.md section 3:
t(n, H) ~ 4 + 0.052 n + 2.6e-5 n H + 3.5e-6 n^2 ms per stage) while start-up stays ~1 min; the
4-layer hidden-128 model is dominated by per-step overhead and shows no gain.

"prediction error" is per step on the slowest stage: |predicted - measured| / measured, where
measured is the workers' own compute time of that step (each stage timed after its input
arrived) and predicted comes from the model in use when the step ran. The step interval minus
that compute is the engine's per-step overhead, learnt online and added to the planner's c.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Best of 3 per profiling pass (as `make demo`): single passes on shared CPUs carry outliers.
os.environ.setdefault("DCPP_PROFILE_REPEATS", "3")
# Time every step around every prefill, so that each request's bubbles are measured.
os.environ.setdefault("DCPP_BUBBLE_SAMPLE_EVERY", "1")
# EngineCore in this process, so the benchmark can read dcpp's scheduler state.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from bench_stats import paired_ci  # noqa: E402  (benchmarks/, beside this script)
from dcpp.online.calibration.noise import repeat_noise  # noqa: E402
from dcpp.tooling import harness  # noqa: E402

MODES = ("off", "pipeline", "equal_time")
LABEL = {"off": "static (vLLM)", "pipeline": "dcpp default", "equal_time": "equal-time"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: a tiny random Llama in a tmp dir)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--prompt-len", type=int, default=16384)
    ap.add_argument("--budget", type=int, default=4096,
                    help="max_num_batched_tokens (default: vLLM 0.32's own default for "
                         "`vllm serve` on CPU with PP=2, 2048 x world size)")
    ap.add_argument("--min-chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9, help="timed runs per mode")
    ap.add_argument("--cache-dir", help="profile cache (default: a fresh tmp dir)")
    ap.add_argument("--no-restart", action="store_true", help="skip the cached-profile restart")
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def start(args, model: str):
    return harness.start_engine(model, budget=args.budget, max_model_len=args.max_model_len,
                                dcpp={"enabled": True, "min_chunk": args.min_chunk})


def run(llm, tokens, mode, max_tokens=1):
    """(seconds, output token ids, request id) of one greedy request under plan ``mode``."""
    return harness.timed_generate(llm, tokens, max_tokens=max_tokens, plan=mode)


def model_ttft(rt, chunks):
    """Each executed plan's TTFT in seconds under the calibrated model (to compare with the
    measured medians: which side of a ratio the model gets wrong)."""
    from dcpp.chunker.planner import plan_cost

    return {m: plan_cost(rt.model, chunks[m], rt.predictors["pipeline"].spec.num_stages)
            for m in MODES}


def model_ratios(rt, prompt_len, ttft):
    """Each executed plan's predicted TTFT (``ttft``, from `model_ttft`), and the DP optimum's,
    relative to static."""
    from dcpp.chunker.planner import optimal_plan, plan_cost

    spec = rt.predictors["pipeline"].spec
    out = {m: ttft[m] / ttft["off"] for m in MODES}
    best = optimal_plan(rt.model, prompt_len, spec, max_points=256, rel_tol=1e-3)
    out["dp_optimum"] = plan_cost(rt.model, best, spec.num_stages) / ttft["off"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.max_model_len = args.prompt_len + 64
    tmp = tempfile.mkdtemp(prefix="dcpp_ttft_")
    os.environ["DCPP_CACHE_DIR"] = args.cache_dir or os.path.join(tmp, "profiles")
    model = args.model or str(harness.tiny_llama(os.path.join(tmp, "model"), layers=args.layers,
                                                 hidden=args.hidden, max_len=args.max_model_len))
    tokens = harness.prompt_tokens(args.prompt_len)

    t0 = time.perf_counter()
    llm = start(args, model)
    startup_s = time.perf_counter() - t0
    rt = harness.dcpp_runtime(llm)
    if rt is None or rt.model is None:
        print("dcpp is not active (profiling failed?); see the log above", file=sys.stderr)
        return 2
    print(f"start-up {startup_s:.1f} s; profile: {rt.profile.source}, "
          f"{rt.profile.passes} profiling passes; fit {rt.model.to_dict()}")

    # Greedy outputs must match across plans (8 tokens), and this warms every mode up.
    greedy, chunks = {}, {}
    for mode in MODES:
        _, greedy[mode], rid = run(llm, tokens, mode, max_tokens=8)
        chunks[mode] = harness.chunks_of(rt, rid)
    match = all(greedy[m] == greedy["off"] for m in MODES)
    # Report the prediction error of the timed rounds only, i.e. after calibration had the
    # warm-up runs' step timings.
    if rt.cal is not None:
        rt.cal.errors.clear()

    ttft = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            secs, _, rid = run(llm, tokens, mode)
            ttft[mode].append(secs)
            chunks[mode] = harness.chunks_of(rt, rid)  # the last timed round's
        print(f"round {r + 1}: " + ", ".join(f"{m} {ttft[m][-1]:.3f}s" for m in MODES),
              flush=True)

    result = {
        "prompt_len": args.prompt_len, "budget": args.budget, "min_chunk": args.min_chunk,
        "layers": args.layers, "hidden": args.hidden, "rounds": args.rounds,
        "startup_s": startup_s, "profile_source": rt.profile.source,
        "profile_passes": rt.profile.passes,
        "greedy_match": match, "chunks": chunks,
        "ttft": ttft,
        "best": {m: min(v) for m, v in ttft.items()},
        "median": {m: statistics.median(v) for m, v in ttft.items()},
        # Each round runs every mode back to back: its ratio to that round's static run
        # cancels the slow drifts of a shared machine; the median over rounds is the headline.
        "paired_median": {m: statistics.median(a / b for a, b in zip(v, ttft["off"]))
                          for m, v in ttft.items()},
        "paired_ci90": {m: paired_ci(v, ttft["off"]) for m, v in ttft.items() if m != "off"},
        "static_spread": max(ttft["off"]) / min(ttft["off"]),
        "prediction_error_median": rt.cal.median_error(),
        "repeat_noise": repeat_noise(list(rt.cal.step_log)),
        "num_observations": rt.cal.num_observations, "num_refits": rt.cal.num_refits,
        "stage_timing": rt.stage_timing, "overhead_s": rt.cal.overhead_s(),
        "interval_error_median": rt.stats()["median_interval_error"],
        # Measured stage idle share of each prefill (workers' step start/end times), per mode.
        "bubbles": rt.stats()["bubbles"],
        "fit": rt.model.to_dict(),
        "model_ttft": model_ttft(rt, chunks),
        "step_log": list(rt.cal.step_log),
    }
    result["model_ratios"] = model_ratios(rt, args.prompt_len, result["model_ttft"])
    harness.shutdown(llm)
    del llm

    if not args.no_restart:
        t0 = time.perf_counter()
        llm = start(args, model)
        rt2 = harness.dcpp_runtime(llm)
        result["restart"] = {"startup_s": time.perf_counter() - t0,
                             "profile_source": rt2.profile.source,
                             "profile_passes": rt2.profile.passes,
                             "calibration_steps": len(rt2.cal.samples) if rt2.cal is not None else 0,
                             "overhead_s": rt2.cal.overhead_s()}
        # The restarted engine's first planned request: planned from the saved calibration
        # rather than from the bare profile.
        secs, _, rid = run(llm, tokens, "pipeline")
        result["restart"]["first_ttft"] = secs
        result["restart"]["first_chunks"] = harness.chunks_of(rt2, rid)
        result["restart"]["first_error"] = rt2.cal.median_error()
        harness.shutdown(llm)
        del llm

    print()
    print(f"TTFT, prompt {args.prompt_len} tokens, PP=2 CPU, budget {args.budget}, "
          f"{args.rounds} interleaved rounds in one engine")
    print(f"{'mode':<16}{'best s':>9}{'median s':>10}{'best/static':>13}{'median/static':>15}"
          f"{'paired median':>15}{'chunks':>8}")
    for m in MODES:
        b, md = result["best"][m], result["median"][m]
        print(f"{LABEL[m]:<16}{b:>9.3f}{md:>10.3f}{b / result['best']['off']:>13.3f}"
              f"{md / result['median']['off']:>15.3f}{result['paired_median'][m]:>15.3f}"
              f"{len(chunks[m]):>8}")
    print(f"(paired median: median over rounds of TTFT / the same round's static TTFT; the "
          f"static runs alone spread {result['static_spread']:.2f}x slowest/fastest)")
    print("90% bootstrap interval of the paired median: " + ", ".join(
        f"{LABEL[m]} {lo:.3f}-{hi:.3f}" for m, (lo, hi) in result["paired_ci90"].items()))
    for m in MODES:
        print(f"chunks {LABEL[m]}: {chunks[m]}")
    print(f"greedy outputs identical across modes: {match}")
    print(f"median chunk-latency prediction error (after calibration, {rt.cal.num_observations} "
          f"steps, {rt.cal.num_refits} refits): {100 * result['prediction_error_median']:.1f}%")
    rn = result["repeat_noise"]
    print(f"noise floor: {rn['steps']} steps that ran the same (chunk, history) >= 3 times scatter "
          f"{100 * rn['noise']:.1f}% (median) around their own median; against those medians the "
          f"model is off by {100 * rn['systematic']:.1f}% ({rn['groups']} groups)")
    print(f"per-stage step timing: {rt.stage_timing}; learnt per-step overhead "
          f"{1e3 * result['overhead_s']:.2f} ms; median step-interval prediction error "
          f"{100 * result['interval_error_median']:.1f}%")
    bub = result["bubbles"]["by_plan"]
    print("measured prefill bubble fraction (median over requests, from the workers' step "
          "times): " + ", ".join(f"{LABEL.get(m, m)} {100 * v['median']:.1f}% (n={v['count']})"
                                 for m, v in bub.items()))
    mr = result["model_ratios"]
    print("under the calibrated model (sum(s) + (P-1)*max(s), s incl. overhead): "
          + ", ".join(f"{k} {v:.3f}" for k, v in mr.items()) + " of static; "
          + ", ".join(f"{LABEL[m]} {result['model_ttft'][m]:.3f} s" for m in MODES)
          + " (measured medians above)")
    if "restart" in result:
        rs = result["restart"]
        print(f"restart: profile {rs['profile_source']}, {rs['profile_passes']} profiling passes, "
              f"start-up {rs['startup_s']:.1f} s; calibration loaded: {rs['calibration_steps']} "
              f"step timings, overhead {1e3 * rs['overhead_s']:.2f} ms; first dcpp-default "
              f"request {rs['first_ttft']:.3f} s in {len(rs['first_chunks'])} chunks (last timed "
              f"round before the restart: {len(chunks['pipeline'])}), its median prediction "
              f"error {100 * rs['first_error']:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
