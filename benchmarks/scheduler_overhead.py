"""What dcpp adds to vLLM's scheduler per step, measured side by side with no model.

vLLM's own `Scheduler` and dcpp's `DcppScheduler` get the same request stream (C long prompts
kept in flight, plus decoding chat requests), fake model outputs and, for dcpp, synthetic
per-stage timings from `offline.SyntheticExecutor` (profiling and calibration run as in an
engine). Reports per concurrency the per-call time of `schedule()` and of
`update_from_output()` for both (median, p99; the two run in lockstep, one step each in turn,
so machine noise hits both alike) and dcpp's addition at p99, the steps the
workers timed (and synchronised on) out of all steps, and the time to plan one 1M-token
prompt from scratch.

The per-stage timings come from one latency model per run (``--models``, each in turn): the
synthetic executor's default stage (`offline.SyntheticExecutor`, form "causal": the work
telescopes), the
demo's cached profile (form "full", beta != 2*alpha, delta > 0) and that profile's fit in the
"ascend" form (beta = alpha, delta = gamma); dcpp profiles and fits each as in an engine. Then
the planning cost per model (`plan_cost`): `default_plan` from scratch for 3k-1M-token prompts
at P = 2, 4, 8 under the benchmark's limits (budget 2048, min_chunk 256), median and p99 ms.

    .venv/bin/python benchmarks/scheduler_overhead.py [--steps 2000] [--repeats 3] [--json out.json]
    .venv/bin/python benchmarks/scheduler_overhead.py --models full ascend --plans-only
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
MIN_CHUNK = 256

PLAN_LENGTHS = (3072, 8192, 16384, 32768, 131072, MAX_LEN - 1)
PLAN_STAGES = (2, 4, 8)

# The demo's cached profile (per stage; `make demo` on this machine), form "full".
DEMO_PROFILE = dict(alpha=2.37e-8, beta=3.02e-8, gamma=1.94e-5, delta=4.9e-7, c=3.5e-3)


def latency_models() -> dict:
    """name -> (per-stage HistoryLatencyModel, what it is)."""
    from dcpp.chunker.latency_model import HistoryLatencyModel
    from dcpp.tooling import offline

    full = HistoryLatencyModel(**DEMO_PROFILE)
    # The demo profile fitted in the "ascend" form, as a server here fitted it: timings of the
    # full model over chunks 256-4096 and histories 0-16k (a profiling design's range).
    pts = [(c, h) for c in (256, 512, 1024, 2048, 3072, 4096) for h in (0, 2048, 6144, 10240, 16384)]
    ascend = HistoryLatencyModel.fit([([(c, h)], float(full.predict_time(c, h))) for c, h in pts],
                                     form="ascend")
    # The synthetic executor's default stage: 2e-3 + 2e-6*C + 4e-9*C*H + 2e-9*C^2 seconds.
    synthetic = HistoryLatencyModel(alpha=2e-9, beta=4e-9, gamma=2e-6, delta=0.0, c=2e-3)
    stage = offline.SyntheticExecutor().fn
    assert all(abs(float(synthetic.predict_time(c, h)) - stage(c, h)) < 1e-12
               for c, h in ((300, 700), (2048, 100_000))), "the synthetic stage changed"
    return {
        "synthetic": (synthetic, "the synthetic executor's stage, form causal (beta = 2*alpha, "
                                 "delta = 0)"),
        "full": (full, "the demo's cached profile, form full (beta != 2*alpha, delta > 0)"),
        "ascend": (ascend, "the demo profile fitted in the ascend form (beta = alpha, "
                           "delta = gamma)"),
    }


def drive(cls, model_dir, concurrency: int, steps: int, seed: int, dcpp: dict | None,
          stage=None):
    """A generator: one scheduler step per `next()`; its return value is the report.
    ``stage``: seconds(chunk, history) of one stage (default: the synthetic stage)."""
    from dcpp.tooling import offline

    ex = (offline.SyntheticExecutor(stage) if stage is not None else offline.SyntheticExecutor()
          ) if dcpp is not None else None
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


def plan_1m(model_dir, stage=None) -> dict:
    """Planning one 1M-token prompt from scratch with the profile the benchmark used."""
    from dcpp.chunker.predictor import ChunkPredictor
    from dcpp.tooling import offline
    from dcpp.integration.vllm.scheduler import DcppScheduler

    ex = offline.SyntheticExecutor(stage) if stage is not None else offline.SyntheticExecutor()
    sched = offline.build_scheduler(DcppScheduler, model_dir, budget=BUDGET, max_model_len=MAX_LEN,
                                    dcpp={"enabled": True, "min_chunk": MIN_CHUNK}, executor=ex)
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
            "chunks": len(plan), "model": pred.model.to_dict()}


def plan_cost(model, repeats: int = 5, planner=None) -> dict:
    """`default_plan` (or ``planner``, e.g. `dp_default_plan`: the planner before issue 20)
    from scratch under ``model`` for every length in PLAN_LENGTHS and P in PLAN_STAGES,
    ``repeats`` rounds over the grid: median, p99 and largest ms over all plans, the median
    of each round's median (and the range of those: how much the machine moved it), per
    length, and the prices (`RampPlan.price`) and rule passes (`Rule.sweep`) per plan."""
    from dcpp.chunker import rule as rule_mod
    from dcpp.chunker.planner import PlanSpec, default_plan, ramp_applies
    from dcpp.chunker.ramp import RampPlan

    default_plan = planner or default_plan
    counts = {"passes": 0}
    price, sweep = RampPlan.price, rule_mod.Rule.sweep

    def counted_price(rp, m):
        counts["passes"] += 1
        return price(rp, m)

    def counted_sweep(r, *a, **k):
        counts["passes"] += 1
        return sweep(r, *a, **k)

    cells = [(n, p) for n in PLAN_LENGTHS for p in PLAN_STAGES]
    specs = {p: PlanSpec(max_num_batched_tokens=BUDGET, max_model_len=MAX_LEN, num_stages=p,
                         min_chunk=MIN_CHUNK, page_size=16) for p in PLAN_STAGES}
    passes, paths = [], set()
    for n, p in cells:  # counted, untimed (and warms the code)
        paths.add(ramp_applies(model, n, specs[p]))
        counts["passes"] = 0
        RampPlan.price, rule_mod.Rule.sweep = counted_price, counted_sweep
        try:
            default_plan(model, n, specs[p])
        finally:
            RampPlan.price, rule_mod.Rule.sweep = price, sweep
        passes.append(counts["passes"])
    times, by_len, round_medians = [], {}, []
    for _ in range(repeats):
        this = []
        for n, p in cells:
            t0 = time.perf_counter()
            default_plan(model, n, specs[p])
            dt = 1e3 * (time.perf_counter() - t0)
            this.append(dt)
            by_len.setdefault(n, []).append(dt)
        times += this
        round_medians.append(statistics.median(this))
    return {"median_ms": pct(np.asarray(times) / 1e3, 50), "p99_ms": pct(np.asarray(times) / 1e3, 99),
            "max_ms": max(times), "round_median_ms": statistics.median(round_medians),
            "round_median_range_ms": [min(round_medians), max(round_medians)],
            "passes_median": statistics.median(passes), "passes_max": max(passes),
            "search": sorted(paths),
            "by_length_ms": {str(n): [statistics.median(v), max(v)] for n, v in by_len.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3,
                    help="lockstep runs per concurrency (p99 over 2000 steps moves by ~0.2 ms)")
    ap.add_argument("--models", nargs="+", default=["synthetic", "full", "ascend"],
                    choices=["synthetic", "full", "ascend"],
                    help="latency models of the stages, each in turn (the first one's results "
                         "are also the report's top-level `runs` and `plan_1m`)")
    ap.add_argument("--plans-only", action="store_true",
                    help="only the planning cost per model (no vLLM needed)")
    ap.add_argument("--plan-repeats", type=int, default=5)
    ap.add_argument("--previous", action="store_true",
                    help="also time the planner before issue 20 (`dp_default_plan`, its DP)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("DCPP_CACHE_DIR", tempfile.mkdtemp(prefix="dcpp-bench-"))
    models = latency_models()
    out = {"budget": BUDGET, "min_chunk": MIN_CHUNK, "steps": args.steps, "models": {}}
    if not args.plans_only:
        from vllm.v1.core.sched.scheduler import Scheduler

        from dcpp.tooling.harness import tiny_llama
        from dcpp.integration.vllm.scheduler import DcppScheduler

        model_dir = tiny_llama(os.path.join(os.environ["DCPP_CACHE_DIR"], "llama"), layers=2,
                               hidden=64, max_len=MAX_LEN)
        dcpp = {"enabled": True, "min_chunk": MIN_CHUNK}
    for name in args.models:
        model, what = models[name]
        rec = out["models"].setdefault(name, {"model": model.to_dict(), "what": what})
        print(f"\n== stages timed by {name}: {what}\n   alpha={model.alpha:.3g} "
              f"beta={model.beta:.3g} gamma={model.gamma:.3g} delta={model.delta:.3g} c={model.c:.3g}")
        if not args.plans_only:
            stage = (lambda c, h, m=model: float(m.predict_time(c, h))) if name != "synthetic" else None
            print(f"{'C':>3} {'vLLM sched p50/p99':>19} {'dcpp sched p50/p99':>19} {'added p99':>9} "
                  f"{'vLLM upd p99':>12} {'dcpp upd p99':>12} {'timed/all':>10} {'plans':>5} {'put off':>7}")
            runs = rec.setdefault("runs", {})
            for c in args.concurrency:
                for rep in range(args.repeats):
                    row = _run_row(Scheduler, DcppScheduler, model_dir, c, args.steps, dcpp, stage)
                    added = runs.setdefault(str(c), row).setdefault("added_p99_ms_repeats", [])
                    added.append(row["added_schedule_p99_ms"])
                if args.repeats > 1:
                    print(f"{c:>3} added p99 over {args.repeats} runs: median "
                          f"{statistics.median(added):.3f} ms, range {min(added):.3f}-{max(added):.3f} ms")
            rec["plan_1m"] = p = plan_1m(model_dir, stage)
            print(f"planning one {MAX_LEN - 1}-token prompt (the model dcpp fitted): median "
                  f"{p['median_ms']:.1f} ms (max {p['max_ms']:.1f} ms, {p['chunks']} chunks)")
        rec["plan_cost"] = pc = plan_cost(model, args.plan_repeats)
        lens = ", ".join(f"{int(n) // 1024}k {v[0]:.2f}/{v[1]:.2f}" for n, v in pc["by_length_ms"].items())
        print(f"plan cost ({name}, default_plan from scratch, {len(PLAN_LENGTHS)} lengths 3k-1M x "
              f"P {'/'.join(map(str, PLAN_STAGES))} x {args.plan_repeats}): median "
              f"{pc['median_ms']:.3f} ms, p99 {pc['p99_ms']:.3f} ms, max {pc['max_ms']:.3f} ms "
              f"(median of the rounds' medians {pc['round_median_ms']:.3f} ms, rounds "
              f"{pc['round_median_range_ms'][0]:.3f}-{pc['round_median_range_ms'][1]:.3f}); "
              f"passes per plan median {pc['passes_median']:g}, max {pc['passes_max']} "
              f"(search: {', '.join(pc['search'])})\n   per length median/max ms: {lens}")
        if args.previous:
            from dcpp.chunker.planner import dp_default_plan

            rec["plan_cost_previous"] = pp = plan_cost(model, args.plan_repeats, dp_default_plan)
            lens = ", ".join(f"{int(n) // 1024}k {v[0]:.2f}/{v[1]:.2f}"
                             for n, v in pp["by_length_ms"].items())
            print(f"  before issue 20 (dp_default_plan): median {pp['median_ms']:.3f} ms, p99 "
                  f"{pp['p99_ms']:.3f} ms, max {pp['max_ms']:.3f} ms (rounds' medians "
                  f"{pp['round_median_range_ms'][0]:.3f}-{pp['round_median_range_ms'][1]:.3f} ms)"
                  f"\n   per length median/max ms: {lens}")
    first = out["models"][args.models[0]]
    for key in ("runs", "plan_1m"):
        if key in first:
            out[key] = first[key]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _run_row(theirs_cls, ours_cls, model_dir, c: int, steps: int, dcpp: dict,
             stage=None) -> dict:
    """One lockstep run of both schedulers at concurrency ``c``, printed as one row."""
    theirs, ours = lockstep(drive(theirs_cls, model_dir, c, steps, seed=c, dcpp=None),
                            drive(ours_cls, model_dir, c, steps, seed=c, dcpp=dcpp, stage=stage))
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
