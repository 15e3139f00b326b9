"""`make demo`: vLLM (CPU build, PP=2) with and without dcpp on the same long prompt.

1. Generates a tiny Llama checkpoint locally (transformers, random init; nothing downloaded).
2. Starts vLLM without ``profiling_chunk_config`` (static chunks), times the prompt's TTFT.
3. Starts vLLM with ``{"profiling_chunk_config": {"enabled": true, ...}}``: start-up profiling,
   dynamic chunks, online calibration; times the same prompt.
4. Prints TTFT static vs dynamic, each chunk sequence, predicted vs measured chunk latency, the
   measured pipeline bubbles per mode (`dcpp.online.bubbles`: stage idle share during the
   prefill, from the workers' step start/end times) beside the simulated ones, and whether the
   greedy outputs match; draws the pipeline timeline of both plans as PNG and SVG: simulated
   with the calibrated latency model (left) and measured on the workers for the last request of
   each mode (right).

Two engines on a shared 2-core machine differ by up to ~20% on their own (DESIGN.md §3), so the
dcpp engine also runs the prompt with vLLM's static chunks (``dcpp_plan: "off"``) interleaved
with the dynamic runs: that in-engine ratio is the fair comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's passes take milliseconds: time each profiling sample 3 times (fastest
# counts) so a noisy neighbour on a shared 2-core machine does not spoil the fit.
os.environ.setdefault("DCPP_PROFILE_REPEATS", "3")
BUBBLE_ENV = "DCPP_BUBBLE_SAMPLE_EVERY"
"""Set to 1 while `main` runs (engines inherit it): every step around every prefill is timed,
so that each request's bubbles are measured (on CPU a stage's compute is synchronous: timing
costs nothing). Restored afterwards: an in-process caller (a test) keeps its own setting."""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="dcpp demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=12288)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--min-chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per mode")
    ap.add_argument("--out", default="out/demo", help="folder for the model, timeline, profile")
    ap.add_argument("--quick", action="store_true",
                    help="reduced size (CI): 4 layers, hidden 128, 4096-token prompt, budget 1024")
    args = ap.parse_args(argv)
    if args.quick:
        # Passes long enough (tens of ms) for a steady start-up profile on a busy machine.
        args.prompt_len, args.layers, args.hidden = 4096, 4, 128
        args.budget, args.min_chunk, args.rounds = 1024, 128, 1
    for name in ("prompt_len", "layers", "hidden", "budget", "min_chunk", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


class Ticker:
    """Prints elapsed seconds every 10 s while an engine starts (start-up takes a minute)."""

    def __init__(self, what: str) -> None:
        self.what, self.stop = what, threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(10):
            print(f"   ... {self.what}: {time.perf_counter() - self.t0:.0f} s", flush=True)

    def __enter__(self):
        print(f"-> {self.what} (about a minute on 2 cores)", flush=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        print(f"   {self.what}: done in {time.perf_counter() - self.t0:.0f} s", flush=True)


def main(argv=None) -> int:
    before = os.environ.get(BUBBLE_ENV)
    os.environ.setdefault(BUBBLE_ENV, "1")
    try:
        return _main(argv)
    finally:
        if before is None:
            os.environ.pop(BUBBLE_ENV, None)


def _main(argv=None) -> int:
    args = parse_args(argv)
    from dcpp.tooling import harness

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_len = args.prompt_len + 64
    model = out / f"tiny-llama-{args.layers}x{args.hidden}"
    print(f"-> tiny Llama checkpoint ({args.layers} layers, hidden {args.hidden}) at {model}")
    harness.tiny_llama(model, layers=args.layers, hidden=args.hidden, max_len=max_len)
    tokens = harness.prompt_tokens(args.prompt_len)
    common = dict(budget=args.budget, max_model_len=max_len)

    # --- vLLM as is -------------------------------------------------------------------------
    with Ticker("starting vLLM without dcpp (static chunks)"):
        llm = harness.start_engine(model, **common)
    try:
        harness.timed_generate(llm, tokens)  # warm-up
        static_runs = [harness.timed_generate(llm, tokens)[0] for _ in range(args.rounds)]
        static_out = harness.timed_generate(llm, tokens, max_tokens=8)[1]
    finally:
        harness.shutdown(llm)

    # --- vLLM + dcpp ------------------------------------------------------------------------
    # The profile is cached next to the model: a second `make demo` loads it (0 passes).
    dcpp_cfg = {"enabled": True, "min_chunk": args.min_chunk,
                "profile_cache_dir": str(out / "profiles")}
    with Ticker("starting vLLM with profiling_chunk_config (includes start-up profiling)"):
        llm = harness.start_engine(model, dcpp=dcpp_cfg, **common)
    try:
        rt = harness.dcpp_runtime(llm)
        if rt is None or rt.model is None:
            print("dcpp did not activate (profiling failed: see the warning above)")
            return 1
        harness.timed_generate(llm, tokens)  # warm-up, and first calibration steps
        harness.timed_generate(llm, tokens, plan="off")
        dyn_runs, off_runs, rid, off_rid = [], [], None, None
        dyn_ids, off_ids = [], []
        for _ in range(args.rounds):  # interleaved; the dynamic run last
            secs, _, off_rid = harness.timed_generate(llm, tokens, plan="off")
            off_runs.append(secs)
            off_ids.append(off_rid)
            secs, _, rid = harness.timed_generate(llm, tokens)
            dyn_runs.append(secs)
            dyn_ids.append(rid)
        dyn_chunks = harness.chunks_of(rt, rid)
        steps = last_run_steps(rt, dyn_chunks)
        measured = {"static": measured_bubbles(rt, off_ids),
                    "dynamic": measured_bubbles(rt, dyn_ids)}
        dyn_out = harness.timed_generate(llm, tokens, max_tokens=8)[1]
        stage_model = getattr(rt, "compute_model", None) or rt.model
        fit_source, passes = rt.profile.source, rt.profile.passes
        err = rt.cal.median_error()
    finally:
        harness.shutdown(llm)

    static_chunks = harness.static_chunks(args.prompt_len, args.budget)
    report(args, static_runs, dyn_runs, off_runs, static_chunks, dyn_chunks, steps,
           static_out == dyn_out, fit_source, passes, err)
    report_bubbles(stage_model, static_chunks, dyn_chunks, measured)
    paths = draw(args, out, stage_model, static_chunks, dyn_chunks,
                 {mode: runs[-1] for mode, runs in measured.items() if runs and runs[-1]})
    print(f"\ntimeline (left: simulated with the calibrated stage model; right: measured on the "
          f"workers, last request per mode): {', '.join(map(str, paths))}")
    return 0 if static_out == dyn_out else 1


def measured_bubbles(rt, request_ids: list[str]) -> list:
    """The measured `PrefillBubble` of each request (None where it was not measured)."""
    results = list(rt.timing.bubbles.results)
    found = []
    for rid in request_ids:  # vLLM appends a suffix to request ids internally
        got = [r for r in results
               if r.request_id == rid or r.request_id.rsplit("-", 1)[0] == rid]
        found.append(got[-1] if got else None)
    return found


def report_bubbles(stage_model, static_chunks, dyn_chunks, measured) -> None:
    from dcpp.chunker.simulate import simulate

    print("\npipeline bubbles (share of stage-time idle during the prefill, mean of stages):")
    print(f"{'':10}{'simulated':>11}{'measured last':>15}{'measured mean':>15}{'runs':>6}"
          f"{'window ms (last)':>18}")
    for mode, chunks in (("static", static_chunks), ("dynamic", dyn_chunks)):
        sim = simulate(chunks, stage_model, 2).bubble_fraction
        runs = [r for r in measured.get(mode, []) if r is not None]
        last = measured.get(mode, [None])[-1] if measured.get(mode) else None
        mean = statistics.mean(r.fraction for r in runs) if runs else float("nan")
        print(f"{mode:10}{sim:>11.1%}"
              f"{(f'{last.fraction:.1%}' if last else 'n/a'):>15}{mean:>15.1%}{len(runs):>6}"
              f"{(f'{1e3 * last.window_s:.1f}' if last else 'n/a'):>18}")
        if last is not None:
            print(f"{'':10}stage idle (last run): "
                  + ", ".join(f"stage {s} {x:.1%}" for s, x in enumerate(last.stage_idle)))


def last_run_steps(rt, chunks: list[int]) -> list:
    """The step log's entries of the last run of ``chunks`` (one single-request step each),
    or [] when the timings of that run are not (all) in the log."""
    log = list(getattr(rt, "step_log", []))
    tail = log[-len(chunks):] if chunks else []
    if len(tail) == len(chunks) and all(len(b) == 1 and b[0][0] == c
                                        for (b, _, _), c in zip(tail, chunks)):
        return tail
    return []


def _fmt(runs):
    return f"{min(runs):6.3f} / {statistics.median(runs):6.3f}"


def report(args, static_runs, dyn_runs, off_runs, static_chunks, dyn_chunks, steps, match,
           fit_source, passes, err) -> None:
    from dcpp.cli import _rle

    print(f"\n== dcpp demo: {args.prompt_len}-token prompt, PP=2, vLLM CPU, budget "
          f"{args.budget}, {args.rounds} timed runs per mode ==")
    print(f"profile: {fit_source} ({passes} profiling passes)")
    print(f"{'':34}{'TTFT best / median s':>22}{'best ratio':>12}{'median ratio':>14}")
    print(f"{'engine A: vLLM static':34}{_fmt(static_runs):>22}{1.0:>12.3f}{1.0:>14.3f}")
    r = lambda a, b: (min(a) / min(b), statistics.median(a) / statistics.median(b))  # noqa: E731
    rb, rm = r(dyn_runs, static_runs)
    print(f"{'engine B: dcpp dynamic':34}{_fmt(dyn_runs):>22}{rb:>12.3f}{rm:>14.3f}")
    print(f"{'engine B: static (dcpp_plan=off)':34}{_fmt(off_runs):>22}")
    rb, rm = r(dyn_runs, off_runs)
    print(f"{'in-engine dynamic / static':34}{'':>22}{rb:>12.3f}{rm:>14.3f}")
    print(f"\nchunks static : {_rle(static_chunks)}  ({len(static_chunks)} steps)")
    print(f"chunks dynamic: {_rle(dyn_chunks)}  ({len(dyn_chunks)} steps)")
    if steps:
        print("\npredicted vs measured chunk latency (slowest stage's compute), last dynamic run:")
        print(f"{'chunk':>7}{'history':>9}{'predicted ms':>14}{'measured ms':>13}{'error':>8}")
        for batch, pred, meas in steps:
            c, h = batch[0] if len(batch) == 1 else (sum(x for x, _ in batch), batch[0][1])
            print(f"{c:>7}{h:>9}{1e3 * pred:>14.2f}{1e3 * meas:>13.2f}"
                  f"{abs(pred / meas - 1):>8.1%}")
    print(f"median chunk-latency prediction error after calibration: {err:.1%}")
    print(f"greedy outputs (8 tokens) identical: {'yes' if match else 'NO'}")


def draw(args, out: Path, stage_model, static_chunks, dyn_chunks, measured=None):
    """Simulated (left) beside measured (right; where measured) timelines, static then
    dynamic."""
    from dcpp.chunker.simulate import simulate
    from dcpp.timeline import bars_from_measured, bars_from_sim, draw_timeline

    measured = measured or {}
    both = all(measured.get(mode) is not None for mode in ("static", "dynamic"))
    timelines = {}
    for mode, label, chunks in (("static", "vLLM static", static_chunks),
                                ("dynamic", "dcpp dynamic", dyn_chunks)):
        timelines[f"{label} ({len(chunks)} chunks), simulated"] = bars_from_sim(
            simulate(chunks, stage_model, 2))
        got = measured.get(mode)
        if got is not None:
            timelines[f"{label} ({len(got.chunks)} chunks), measured"] = bars_from_measured(got)
    return draw_timeline(timelines, out / "timeline", ncols=2 if both else 1,
                         title=f"PP=2, {args.prompt_len}-token prompt on vLLM (CPU)")


if __name__ == "__main__":
    sys.exit(main())
