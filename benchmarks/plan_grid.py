"""TTFT of chunk plans over P x prompt length x cost model (the chunker's benchmark table).

    python benchmarks/plan_grid.py            # `make bench` runs this
    python benchmarks/plan_grid.py --fitted-only [--random 300]

Then the fitted models (`fitted_grid`): the demo's profile (form "full"), its "ascend"-form fit
and the synthetic executor's stage (form "causal") under the scheduler benchmark's limits and
vllm-ascend's default floor: `default_plan` against the planner before issue 20
(`dp_default_plan`, its coarse DP) as the ratio of their objectives, and both planners' time
per plan; ``--random N`` adds N random models of every shape the "full" fit allows.

Cost models come from FLOP counts of named models on named hardware (bf16):

* whole model, chunk of C new tokens after H cached ones:
  t(C, H) = A * ((H+C)^2 - H^2) / 2 + L * C      [FLOPs] / R     (causal attention)
  A = 4 * layers * heads * head_dim   FLOPs per (query, key) pair (QK^T and PV, 2 per MAC)
  L = 2 * non-embedding parameters    FLOPs per token (all linear layers)
* each of the P stages holds 1/P of the layers on its own device group of throughput R, plus a
  fixed step_overhead per step (scheduling, launches, P2P hand-off; assumed 3 ms, cf. the
  ~4 ms measured on CPU in DESIGN.md §3): s(C, H) = t(C, H) / P + step_overhead.

Limits: max_num_batched_tokens 32768 (vllm-ascend's DeepSeek example used 32k chunks),
min_chunk 4096 (vllm-ascend's default), page 16 (alignment 64), smooth_factor 1.
The DP optimum is exact up to 1e-4 on a grid of <= 1024 boundaries (64 tokens at 64k, coarser
above, so at 1M the default, on the 64-token alignment, can beat the grid DP slightly).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planner import (PlanSpec, default_plan, dp_default_plan, equal_time_plan,
                                  ramp_applies, lower_bound, optimal_plan, plan_cost, static_plan)
from dcpp.chunker.predictor import ChunkPredictor
from dcpp.chunker.simulate import simulate
from dcpp.config import ProfilingChunkConfig

H100_BF16 = 989e12
"""NVIDIA H100 SXM dense bf16 peak FLOP/s (datasheet)."""


@dataclass(frozen=True)
class CostModel:
    name: str
    """Table label."""
    source: str
    """Model and hardware the numbers come from."""
    attn_flops_per_pair: float
    """4 * layers * q_heads * head_dim."""
    linear_flops_per_token: float
    """2 * non-embedding parameters."""
    stage_flops_per_s: float
    """Effective throughput of one stage's device group."""
    step_overhead_s: float = 0.003
    """Fixed cost per step per stage."""

    def stage_model(self, p: int) -> HistoryLatencyModel:
        a = self.attn_flops_per_pair / 2 / self.stage_flops_per_s / p
        b = self.linear_flops_per_token / self.stage_flops_per_s / p
        return HistoryLatencyModel(alpha=a, beta=2 * a, gamma=b, delta=0.0, c=self.step_overhead_s)


COST_MODELS = (
    # Llama-3.1-8B: 32 layers, 32 q heads x 128, hidden 4096, FFN 14336 -> 6.98e9 non-embedding
    # params; attention per token at context L is L/53k of its linear work: attention-heavy.
    CostModel("attn-heavy", "Llama-3.1-8B, 1x H100 per stage, 50% MFU",
              4 * 32 * 32 * 128, 2 * 6.98e9, 0.5 * H100_BF16),
    # Llama-3.1-405B: 126 layers, 128 q heads x 128, hidden 16384, FFN 53248 -> 4.016e11
    # params; attention is L/194k of linear work: linear-heavy up to ~200k tokens.
    CostModel("linear-heavy", "Llama-3.1-405B, 8x H100 (TP=8) per stage, 40% MFU",
              4 * 126 * 128 * 128, 2 * 4.016e11, 0.4 * 8 * H100_BF16),
)
STAGES = (2, 4, 8)
LENGTHS = (65536, 131072, 262144, 1048576)
BUDGET, MIN_CHUNK, PAGE = 32768, 4096, 16


def _fmt_len(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k"


def run() -> int:
    print(__doc__.split("\n\n")[0])
    for cm in COST_MODELS:
        print(f"  {cm.name}: {cm.source}; A={cm.attn_flops_per_pair:.3g} FLOP/pair, "
              f"L={cm.linear_flops_per_token:.3g} FLOP/token, R={cm.stage_flops_per_s:.3g} FLOP/s, "
              f"step {cm.step_overhead_s * 1e3:g} ms")
    hdr = (f"{'cost model':<13}{'P':>2}{'len':>6}{'K dflt':>7}{'TTFT dflt s':>12}"
           f"{'dflt/static':>12}{'dflt/opt':>9}{'eq/static':>10}{'dflt/eq':>8}{'LB/opt':>7}"
           f"  bubble static/eq/dflt/opt")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    worst_opt, worst_eq, fails = 0.0, 0.0, []
    t_plan_total = 0.0
    for cm in COST_MODELS:
        for p in STAGES:
            model = cm.stage_model(p)
            for n in LENGTHS:
                spec = PlanSpec(max_num_batched_tokens=BUDGET, max_model_len=n, num_stages=p,
                                min_chunk=MIN_CHUNK, page_size=PAGE)
                t0 = time.perf_counter()
                plans = {"static": static_plan(n, spec), "eq": equal_time_plan(model, n, spec),
                         "dflt": default_plan(model, n, spec)}
                t_plan_total += time.perf_counter() - t0
                plans["opt"] = optimal_plan(model, n, spec)
                sims = {k: simulate(v, model, p) for k, v in plans.items()}
                for k, v in plans.items():  # the simulator agrees with the closed form
                    assert abs(sims[k].ttft - plan_cost(model, v, p)) <= 1e-9 * sims[k].ttft
                tt = {k: s.ttft for k, s in sims.items()}
                lb = lower_bound(model, n, spec)
                r_opt, r_eq = tt["dflt"] / tt["opt"], tt["dflt"] / tt["eq"]
                worst_opt, worst_eq = max(worst_opt, r_opt), max(worst_eq, r_eq)
                if r_opt > 1.02 or r_eq > 1 + 1e-12:
                    fails.append((cm.name, p, n))
                bub = "/".join(f"{sims[k].bubble_fraction:.0%}" for k in ("static", "eq", "dflt", "opt"))
                print(f"{cm.name:<13}{p:>2}{_fmt_len(n):>6}{len(plans['dflt']):>7}"
                      f"{tt['dflt']:>12.2f}{tt['dflt'] / tt['static']:>12.3f}{r_opt:>9.4f}"
                      f"{tt['eq'] / tt['static']:>10.3f}{r_eq:>8.3f}{lb / tt['opt']:>7.3f}  {bub}")
    print(f"\nworst default/optimal {worst_opt:.4f} (target <= 1.02); "
          f"worst default/equal_time {worst_eq:.4f} (target <= 1)")
    # Predictor cost: plan once per request, then cached lookups.
    cm = COST_MODELS[0]
    pred = ChunkPredictor(ProfilingChunkConfig(enabled=True, min_chunk=MIN_CHUNK),
                          cm.stage_model(4), max_num_batched_tokens=BUDGET, page_size=PAGE,
                          max_model_len=1048576, num_stages=4)
    for n in (65536, 1048576):
        t0, h, calls = time.perf_counter(), 0, 0
        while h < n:
            h += pred.next_chunk(h, n - h)
            calls += 1
        dt = time.perf_counter() - t0
        print(f"predictor ({cm.name}, P=4, {_fmt_len(n)}): {calls} next_chunk calls, "
              f"{dt * 1e3:.1f} ms in all (one plan + lookups), {dt / calls * 1e3:.2f} ms/call")
    print(f"default_plan time over the grid: {t_plan_total:.2f} s for "
          f"{len(COST_MODELS) * len(STAGES) * len(LENGTHS)} cells")
    if fails:
        print(f"TARGET MISSED in {fails}")
        return 1
    return 0


# --- fitted models: the new planner against the one before issue 20 ---------------------------
FITTED_LENGTHS = (3072, 8192, 12288, 16384, 32768, 131072, (1 << 20) - 1)
FITTED_LIMITS = ((2048, 256), (4096, 256), (8192, 4096))
"""(budget, min_chunk): the scheduler benchmark's and the demo's, and vllm-ascend's default
floor beside an 8k budget."""


def fitted_models() -> dict:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from scheduler_overhead import latency_models

    return {name: m for name, (m, _) in latency_models().items()}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)


def fitted_grid(models: dict, lengths=FITTED_LENGTHS, limits=FITTED_LIMITS,
                stages=STAGES) -> dict:
    """Per model: new/old objective ratios (worst, median, best, cells worse by > 1e-4 and
    > 1e-3) and both planners' ms per plan (median, p99)."""
    out = {}
    print(f"\n{'model':<10}{'budget/floor':>13}{'cells':>6}{'new/old worst':>14}{'median':>9}"
          f"{'best':>8}{'>1e-4':>6}{'>1e-3':>6}{'new ms p50/p99':>16}{'old ms p50/p99':>16}")
    for name, model in models.items():
        for budget, floor in limits:
            ratios, t_new, t_old = [], [], []
            for n, p in itertools.product(lengths, stages):
                if n <= budget:
                    continue
                spec = PlanSpec(max_num_batched_tokens=budget, max_model_len=1 << 20,
                                num_stages=p, min_chunk=floor, page_size=PAGE)
                new, dt_new = _timed(default_plan, model, n, spec)
                old, dt_old = _timed(dp_default_plan, model, n, spec)
                t_new.append(dt_new)
                t_old.append(dt_old)
                ratios.append(plan_cost(model, new, p) / plan_cost(model, old, p))
            r = np.asarray(ratios)
            row = {"worst": float(r.max()), "median": float(np.median(r)), "best": float(r.min()),
                   "worse_1e4": int((r > 1 + 1e-4).sum()), "worse_1e3": int((r > 1 + 1e-3).sum()),
                   "cells": len(r), "new_ms": [statistics.median(t_new), float(np.percentile(t_new, 99))],
                   "old_ms": [statistics.median(t_old), float(np.percentile(t_old, 99))]}
            out[f"{name} {budget}/{floor}"] = row
            print(f"{name:<10}{f'{budget}/{floor}':>13}{len(r):>6}{row['worst']:>14.5f}"
                  f"{row['median']:>9.5f}{row['best']:>8.4f}{row['worse_1e4']:>6}{row['worse_1e3']:>6}"
                  f"{row['new_ms'][0]:>8.2f}/{row['new_ms'][1]:<7.2f}{row['old_ms'][0]:>8.2f}/{row['old_ms'][1]:<7.2f}")
    return out


def random_grid(count: int, seed: int = 0) -> dict:
    """``count`` random models (each shape the "full" fit allows: kappa = alpha - beta/2 of
    either sign, alpha = 0, delta = 0, the ascend and causal-with-prefix forms), limits and
    histories: new/old ratios per search `default_plan` takes (`ramp_applies`)."""
    from dcpp.chunker.latency_model import HistoryLatencyModel as H

    rng = np.random.default_rng(seed)
    by_path: dict[str, list[float]] = {}
    for _ in range(count):
        a, g, d, c = (10 ** rng.uniform(-11, -8), 10 ** rng.uniform(-7, -4.5),
                      10 ** rng.uniform(-9, -6), 10 ** rng.uniform(-4, -2))
        kind = int(rng.integers(0, 5))
        model = [H(a, a * rng.uniform(0, 3), g, d, c), H(a, a, g, g, c),
                 H(0.0, 10 ** rng.uniform(-11, -8), g, d, c), H(a, 2 * a, g, d, c),
                 H(a, a * rng.uniform(0, 1.9), g, 0.0, c)][kind]
        page = int(rng.choice([16, 64, 128, 96]))
        budget = max(page, 64) * int(rng.integers(2, 64))
        spec = PlanSpec(max_num_batched_tokens=budget, max_model_len=10**7,
                        num_stages=int(rng.integers(2, 9)),
                        min_chunk=int(rng.integers(1, budget + 1)), page_size=page)
        n, h0 = int(rng.integers(1, 400_000)), int(rng.choice([0, 0, 4096, 100_000]))
        path = ramp_applies(model, n, spec, h0)
        if path == "rule" and not float(model.delta) and model.is_telescoping:
            continue
        p = spec.num_stages
        r = plan_cost(model, default_plan(model, n, spec, h0), p, h0) / plan_cost(
            model, dp_default_plan(model, n, spec, h0), p, h0)
        by_path.setdefault(path, []).append(r)
    out = {}
    for path, rs in sorted(by_path.items()):
        r = np.asarray(rs)
        out[path] = {"cells": len(r), "worst": float(r.max()), "median": float(np.median(r)),
                     "best": float(r.min()), "worse_1e3": int((r > 1 + 1e-3).sum()),
                     "worse_1e2": int((r > 1 + 1e-2).sum())}
        print(f"random models, search {path!r}: {len(r)} cells, new/old worst {r.max():.4f}, "
              f"median {np.median(r):.6f}, best {r.min():.4f}; worse by > 0.1%: "
              f"{out[path]['worse_1e3']}, by > 1%: {out[path]['worse_1e2']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fitted-only", action="store_true", help="only the fitted-model comparison")
    ap.add_argument("--random", type=int, default=0, help="random models to compare as well")
    args = ap.parse_args(argv)
    rc = 0 if args.fitted_only else run()
    print("\nFitted models: default_plan (new) against dp_default_plan (before issue 20, with "
          "its coarse DP); ratio of objectives sum(s) + (P-1)*max(s), < 1: new is better; "
          f"lengths {', '.join(_fmt_len(n) if n % 1024 == 0 else str(n) for n in FITTED_LENGTHS)}, "
          f"P {'/'.join(map(str, STAGES))}")
    fitted_grid(fitted_models())
    if args.random:
        random_grid(args.random)
    return rc


if __name__ == "__main__":
    sys.exit(main())
