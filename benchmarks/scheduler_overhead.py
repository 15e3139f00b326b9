"""What dcpp adds to vLLM's scheduler per step, measured side by side with no model.

vLLM's own `Scheduler` and dcpp's `DcppScheduler` get the same request stream (C long prompts
kept in flight, plus decoding chat requests), fake model outputs and, for dcpp, synthetic
per-stage timings from `offline.SyntheticExecutor` (profiling and calibration run as in an
engine). Reports per concurrency the per-call time of `schedule()` and of
`update_from_output()` for both (median, p99; the two run in lockstep, one step each in turn,
so machine noise hits both alike) and dcpp's addition at p99, the steps the
workers timed (and synchronised on) out of all steps, and the time to plan one 1M-token
prompt from scratch.

    .venv/bin/python benchmarks/scheduler_overhead.py [--steps 2000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

BUDGET = 2048
MAX_LEN = 1 << 20
LONG = 32_768
DECODES = 16


def drive(cls, model_dir, concurrency: int, steps: int, seed: int, dcpp: dict | None):
    """A generator: one scheduler step per `next()`; its return value is the report."""
    from dcpp.tooling import offline

    ex = offline.SyntheticExecutor() if dcpp is not None else None
    sched = offline.build_scheduler(cls, model_dir, budget=BUDGET, max_model_len=MAX_LEN,
                                    num_blocks=MAX_LEN // 16 * 2, dcpp=dcpp, executor=ex)
    rng = np.random.default_rng(seed)
    n = 0

    def add_long():
        nonlocal n
        length = int(rng.integers(LONG // 2, LONG))
        sched.add_request(offline.make_request(length, max_tokens=1, seed=n,
                                               request_id=f"long-{n}"))
        n += 1

    for i in range(DECODES):
        sched.add_request(offline.make_request(64, max_tokens=100_000, seed=10_000 + i,
                                               request_id=f"chat-{i}"))
    for _ in range(concurrency):
        add_long()
    t_sched, t_update = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        if ex is not None:
            ex.run(sched, out)
        result = offline.fake_output(sched, out)
        t2 = time.perf_counter()
        sched.update_from_output(out, result)
        t3 = time.perf_counter()
        t_sched.append(t1 - t0)
        t_update.append(t3 - t2)
        longs = sum(1 for rid in sched.requests if rid.startswith("long-"))
        for _ in range(concurrency - longs):
            add_long()
        yield
    res = {"schedule_s": t_sched, "update_s": t_update, "long_prompts_done": n - concurrency}
    if ex is not None:
        res["steps_run"], res["steps_timed"] = ex.steps_run, ex.steps_timed
        res["planner_calls"] = sched.dcpp.sizer.num_plans
        res["plans_put_off"] = sched.dcpp.sizer.num_deferred
    sched.shutdown()
    return res


def lockstep(*runs) -> list[dict]:
    """Step the drives alternately (the order flips every step), so that both schedulers see
    the same machine noise (a shared CPU's p99 moves by milliseconds between runs)."""
    results: list = [None] * len(runs)
    live = list(range(len(runs)))
    flip = False
    while live:
        for i in (reversed(live) if flip else list(live)):
            try:
                next(runs[i])
            except StopIteration as stop:
                results[i] = stop.value
                live.remove(i)
        flip = not flip
    return results


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def plan_1m(model_dir) -> dict:
    """Planning one 1M-token prompt from scratch with the profile the benchmark used."""
    from dcpp.chunker.predictor import ChunkPredictor
    from dcpp.tooling import offline
    from dcpp.integration.vllm.scheduler import DcppScheduler

    sched = offline.build_scheduler(DcppScheduler, model_dir, budget=BUDGET, max_model_len=MAX_LEN,
                                    dcpp={"enabled": True, "min_chunk": 256},
                                    executor=offline.SyntheticExecutor())
    pred = sched.dcpp.predictors["pipeline"]
    times = []
    for _ in range(5):
        fresh = ChunkPredictor(pred.config, pred.model, max_num_batched_tokens=BUDGET,
                               page_size=16, max_model_len=MAX_LEN,
                               num_stages=pred.spec.num_stages)
        t0 = time.perf_counter()
        plan = fresh.plan(MAX_LEN - 1, history=0)
        times.append(time.perf_counter() - t0)
    sched.shutdown()
    return {"median_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times),
            "chunks": len(plan)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3,
                    help="lockstep runs per concurrency (p99 over 2000 steps moves by ~0.2 ms)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("DCPP_CACHE_DIR", tempfile.mkdtemp(prefix="dcpp-bench-"))

    from vllm.v1.core.sched.scheduler import Scheduler

    from dcpp.tooling.harness import tiny_llama
    from dcpp.integration.vllm.scheduler import DcppScheduler

    model_dir = tiny_llama(os.path.join(os.environ["DCPP_CACHE_DIR"], "llama"), layers=2,
                           hidden=64, max_len=MAX_LEN)
    dcpp = {"enabled": True, "min_chunk": 256}
    out = {"budget": BUDGET, "steps": args.steps, "runs": {}}
    print(f"{'C':>3} {'vLLM sched p50/p99':>19} {'dcpp sched p50/p99':>19} {'added p99':>9} "
          f"{'vLLM upd p99':>12} {'dcpp upd p99':>12} {'timed/all':>10} {'plans':>5} {'put off':>7}")
    for c in args.concurrency:
        for rep in range(args.repeats):
            row = _run_row(Scheduler, DcppScheduler, model_dir, c, args.steps, dcpp)
            added = out["runs"].setdefault(str(c), row).setdefault("added_p99_ms_repeats", [])
            added.append(row["added_schedule_p99_ms"])
        if args.repeats > 1:
            print(f"{c:>3} added p99 over {args.repeats} runs: median {statistics.median(added):.3f} "
                  f"ms, range {min(added):.3f}-{max(added):.3f} ms")
    out["plan_1m"] = plan_1m(model_dir)
    p = out["plan_1m"]
    print(f"planning one {MAX_LEN - 1}-token prompt: median {p['median_ms']:.1f} ms "
          f"(max {p['max_ms']:.1f} ms, {p['chunks']} chunks)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _run_row(theirs_cls, ours_cls, model_dir, c: int, steps: int, dcpp: dict) -> dict:
    """One lockstep run of both schedulers at concurrency ``c``, printed as one row."""
    theirs, ours = lockstep(drive(theirs_cls, model_dir, c, steps, seed=c, dcpp=None),
                            drive(ours_cls, model_dir, c, steps, seed=c, dcpp=dcpp))
    row = {
        "vllm_schedule_ms": [pct(theirs["schedule_s"], 50), pct(theirs["schedule_s"], 99)],
        "dcpp_schedule_ms": [pct(ours["schedule_s"], 50), pct(ours["schedule_s"], 99)],
        "vllm_update_ms": [pct(theirs["update_s"], 50), pct(theirs["update_s"], 99)],
        "dcpp_update_ms": [pct(ours["update_s"], 50), pct(ours["update_s"], 99)],
        "steps_timed": ours["steps_timed"], "steps_run": ours["steps_run"],
        "planner_calls": ours["planner_calls"], "plans_put_off": ours["plans_put_off"],
        "long_prompts_done": [theirs["long_prompts_done"], ours["long_prompts_done"]],
    }
    row["added_schedule_p99_ms"] = row["dcpp_schedule_ms"][1] - row["vllm_schedule_ms"][1]
    print(f"{c:>3} {row['vllm_schedule_ms'][0]:8.3f}/{row['vllm_schedule_ms'][1]:8.3f} ms "
          f"{row['dcpp_schedule_ms'][0]:8.3f}/{row['dcpp_schedule_ms'][1]:8.3f} ms "
          f"{row['added_schedule_p99_ms']:7.3f} ms {row['vllm_update_ms'][1]:9.3f} ms "
          f"{row['dcpp_update_ms'][1]:9.3f} ms {ours['steps_timed']:>4}/{ours['steps_run']:<5} "
          f"{ours['planner_calls']:>5} {ours['plans_put_off']:>7}")
    return row


if __name__ == "__main__":
    sys.exit(main())
