"""TTFT of chunk plans over P x prompt length x cost model (the chunker's benchmark table).

    python benchmarks/plan_grid.py            # `make bench` runs this

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

import sys
import time
from dataclasses import dataclass

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planner import (PlanSpec, default_plan, equal_time_plan, lower_bound,
                                  optimal_plan, plan_cost, static_plan)
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


if __name__ == "__main__":
    sys.exit(run())
