"""`serve_load.py`'s summary: pooled metrics per mode, paired ratios to vLLM's chunking and to
the best fixed chunk with bootstrap intervals, the greedy-output check, tables and a plot."""

from __future__ import annotations

from pathlib import Path

from bench_stats import paired_ci, paired_median
from serve_workloads import WORKLOADS, Workload

REFERENCE = "off"
LABEL = {"off": "vLLM (off)", "pipeline": "dcpp default", "equal_time": "equal-time"}
# Per-round metrics; True where higher is better.
METRICS = {"input_tput": True, "req_s": True, "ttft_p50": False, "ttft_p99": False,
           "itl_p50": False, "itl_p99": False}


def label(mode: str) -> str:
    return LABEL.get(mode, mode.replace("fixed-", "fixed "))


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarise(rounds: list[dict[str, dict]], modes: list[str], wl: Workload) -> dict:
    """Pooled metrics per mode, paired ratios to vLLM's and to the best fixed chunk, greedy
    check. ``rounds[r][mode]`` is `run_round`'s result."""
    pooled = {}
    for m in modes:
        rs = [rd[m] for rd in rounds]
        ttft = [x for r in rs for x in r["ttft"]]
        itl = [x for r in rs for x in r["itl"]]
        wall = sum(r["wall_s"] for r in rs)
        pooled[m] = {
            "input_tput": sum(r["prompt_tokens"] for r in rs) / wall,
            "req_s": sum(r["completed"] for r in rs) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "cached_fraction": (sum(r["cached_tokens"] for r in rs)
                                / max(1, sum(r["prompt_tokens"] for r in rs))),
            "requests": sum(r["requests"] for r in rs),
            "completed": sum(r["completed"] for r in rs),
        }

    def ratios(m: str, ref: str) -> dict:
        out = {}
        for k in METRICS:
            a = [rd[m][k] for rd in rounds]
            b = [rd[ref][k] for rd in rounds]
            if any(not (x > 0) for x in a + b):  # nan (no ITL) or 0
                continue
            out[k] = {"median": paired_median(a, b), "ci90": paired_ci(a, b)}
        return out

    vs_off = {m: ratios(m, REFERENCE) for m in modes if m != REFERENCE}
    fixed = [m for m in modes if m.startswith("fixed-")]
    best = None
    if fixed:
        better = max if METRICS[wl.primary] else min
        best = better(fixed, key=lambda m: vs_off[m].get(wl.primary, {}).get("median",
                                                                              float("nan")))
    vs_best = ({m: ratios(m, best) for m in ("pipeline", "equal_time", REFERENCE)
                if m in modes} if best else {})

    # Greedy outputs: every request of a round, every mode against vLLM's.
    mismatches = []
    for r, rd in enumerate(rounds):
        ref = rd[REFERENCE]["outputs"]
        for m in modes:
            for key, ids in rd[m]["outputs"].items():
                if key in ref and ids != ref[key]:
                    mismatches.append({"round": r, "mode": m, "request": key})
    compared = sum(len(set(rd[m]["outputs"]) & set(rd[REFERENCE]["outputs"]))
                   for rd in rounds for m in modes if m != REFERENCE)
    failed = {f"{r}:{m}": rd[m]["failed"] for r, rd in enumerate(rounds) for m in modes
              if rd[m]["failed"]}
    return {"pooled": pooled, "vs_off": vs_off, "best_fixed": best, "vs_best_fixed": vs_best,
            "greedy_identical": not mismatches, "greedy_mismatches": mismatches,
            "greedy_compared": compared,
            "all_completed": not failed, "failed": failed}


def fmt_ratio(d: dict | None) -> str:
    if not d:
        return "-"
    lo, hi = d["ci90"]
    if lo != lo:
        return f"{d['median']:.3f}"
    return f"{d['median']:.3f} ({lo:.2f}-{hi:.2f})"


def print_workload(name: str, s: dict, modes: list[str], rounds: int) -> None:
    wl = WORKLOADS[name]
    print(f"\n== {name}: {wl.describe}, {rounds} rounds; cached prompt tokens "
          f"{100 * s['pooled'][REFERENCE]['cached_fraction']:.0f}% ==")
    print(f"{'mode':<14}{'in tok/s':>9}{'req/s':>7}{'TTFT p50':>9}{'p99':>7}"
          f"{'ITL p50':>8}{'p99':>7}   {'tput/off (90% CI)':<21}{'TTFT p50/off':<21}"
          f"{'ITL p99/off':<21}")
    for m in modes:
        p = s["pooled"][m]
        r = s["vs_off"].get(m, {})
        mark = " *" if m == s["best_fixed"] else ""
        print(f"{label(m) + mark:<14}{p['input_tput']:>9.0f}{p['req_s']:>7.2f}"
              f"{p['ttft_p50']:>9.3f}{p['ttft_p99']:>7.3f}"
              f"{1e3 * p['itl_p50']:>8.1f}{1e3 * p['itl_p99']:>7.1f}   "
              f"{fmt_ratio(r.get('input_tput')) if m != REFERENCE else '1':<21}"
              f"{fmt_ratio(r.get('ttft_p50')) if m != REFERENCE else '1':<21}"
              f"{fmt_ratio(r.get('itl_p99')) if m != REFERENCE else '1':<21}")
    print(f"(TTFT s, ITL ms, pooled over rounds; * = best fixed chunk by {wl.primary}; greedy "
          f"outputs identical: {s['greedy_identical']} ({s['greedy_compared']} compared); "
          f"all completed: {s['all_completed']})")


def headline(summary: dict) -> list[dict]:
    """dcpp default vs the best fixed chunk, beside vLLM's default, per workload."""
    rows = []
    for name, s in summary.items():
        wl = WORKLOADS[name]
        k = wl.primary
        row = {"workload": name, "metric": k, "best_fixed": s["best_fixed"],
               "dcpp_vs_off": s["vs_off"].get("pipeline", {}).get(k),
               "equal_time_vs_off": s["vs_off"].get("equal_time", {}).get(k),
               "best_fixed_vs_off": (s["vs_off"].get(s["best_fixed"], {}).get(k)
                                     if s["best_fixed"] else None),
               "dcpp_vs_best_fixed": s["vs_best_fixed"].get("pipeline", {}).get(k),
               "equal_time_vs_best_fixed": s["vs_best_fixed"].get("equal_time", {}).get(k)}
        if k != "ttft_p50":
            row["dcpp_ttft_p50_vs_off"] = s["vs_off"].get("pipeline", {}).get("ttft_p50")
            row["dcpp_itl_p99_vs_off"] = s["vs_off"].get("pipeline", {}).get("itl_p99")
        rows.append(row)
    return rows


def print_headline(rows: list[dict]) -> None:
    print("\n== headline: paired median ratio over rounds (90% bootstrap interval); "
          "TTFT: lower is better, input throughput: higher is better ==")
    print(f"{'workload':<13}{'metric':<12}{'best fixed':<12}{'dcpp/best fixed':<22}"
          f"{'dcpp/vLLM':<22}{'best fixed/vLLM':<22}{'equal-time/vLLM':<22}")
    for r in rows:
        print(f"{r['workload']:<13}{r['metric']:<12}"
              f"{(r['best_fixed'] or '-').replace('fixed-', ''):<12}"
              f"{fmt_ratio(r['dcpp_vs_best_fixed']):<22}{fmt_ratio(r['dcpp_vs_off']):<22}"
              f"{fmt_ratio(r['best_fixed_vs_off']):<22}{fmt_ratio(r['equal_time_vs_off']):<22}")
    for r in rows:
        if "dcpp_ttft_p50_vs_off" in r:
            print(f"{r['workload']}: dcpp TTFT p50/vLLM {fmt_ratio(r['dcpp_ttft_p50_vs_off'])},"
                  f" ITL p99/vLLM {fmt_ratio(r['dcpp_itl_p99_vs_off'])}")


def plot(summary: dict, modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(modes)
    for ax, key, title in ((axes[0], "input_tput", "input throughput / vLLM's (higher: better)"),
                           (axes[1], "ttft_p50", "TTFT p50 / vLLM's (lower: better)")):
        for j, m in enumerate(modes):
            med, lo, hi = [], [], []
            for n in names:
                d = summary[n]["vs_off"].get(m, {}).get(key) if m != REFERENCE else None
                v = d["median"] if d else 1.0
                ci = d["ci90"] if d else (v, v)
                med.append(v)
                lo.append(v - ci[0] if ci[0] == ci[0] else 0)
                hi.append(ci[1] - v if ci[1] == ci[1] else 0)
            x = np.arange(len(names)) + (j - (len(modes) - 1) / 2) * width
            ax.bar(x, med, width, yerr=[lo, hi], capsize=2, label=label(m))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("dcpp serve_load: paired median ratio per mode and workload (90% bootstrap "
                 "interval), one server, PP=2 CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
