"""`serve_load.py`'s summary: pooled metrics per mode, paired ratios to vLLM's chunking, to
the best fixed chunk and to the best `--long-prefill-token-threshold` server with bootstrap
intervals, the head-of-line ratios against idle runs, the greedy-output check, tables and a
plot."""

from __future__ import annotations

from pathlib import Path

from bench_stats import paired_ci, paired_median
from serve_workloads import WORKLOADS, Workload

REFERENCE = "off"
LABEL = {"off": "vLLM (off)", "pipeline": "dcpp default", "equal_time": "equal-time",
         "lpt-0": "vLLM plain srv"}
# Per-round metrics; True where higher is better. The hol workload's rounds also carry the
# short requests' TTFT p99 and the long prompt's TTFT, and each against its idle run.
METRICS = {"input_tput": True, "req_s": True, "ttft_p50": False, "ttft_p99": False,
           "itl_p50": False, "itl_p99": False, "short_ttft_p99": False, "long_ttft": False,
           "short_vs_idle": False, "long_vs_alone": False}
HOL_TARGETS = {"short_vs_idle": 2.0, "long_vs_alone": 1.05}
"""Issue 20's head-of-line targets: short TTFT p99 <= 2x idle, long TTFT <= 1.05x alone."""


def label(mode: str) -> str:
    if mode in LABEL:
        return LABEL[mode]
    if mode.startswith("lpt-"):
        return "vLLM thr " + mode.split("-", 1)[1]
    return mode.replace("fixed-", "fixed ")


def is_threshold(mode: str) -> bool:
    """A `--long-prefill-token-threshold` server's mode (lpt-0, a plain server, excluded)."""
    return mode.startswith("lpt-") and mode != "lpt-0"


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
            if k not in rounds[0][m] or k not in rounds[0][ref]:
                continue
            a = [rd[m][k] for rd in rounds]
            b = [rd[ref][k] for rd in rounds]
            if any(not (x > 0) for x in a + b):  # nan (no ITL) or 0
                continue
            out[k] = {"median": paired_median(a, b), "ci90": paired_ci(a, b)}
        return out

    vs_off = {m: ratios(m, REFERENCE) for m in modes if m != REFERENCE}
    better = max if METRICS[wl.primary] else min

    def best_of(candidates: list[str]) -> str | None:
        scored = [m for m in candidates if wl.primary in vs_off[m]]
        if not scored:
            return None
        return better(scored, key=lambda m: vs_off[m][wl.primary]["median"])

    best = best_of([m for m in modes if m.startswith("fixed-")])
    best_thr = best_of([m for m in modes if is_threshold(m)])
    vs_best = ({m: ratios(m, best) for m in ("pipeline", "equal_time", REFERENCE)
                if m in modes} if best else {})
    vs_best_thr = ({m: ratios(m, best_thr) for m in ("pipeline", "equal_time", REFERENCE)
                    if m in modes} if best_thr else {})
    hol = {}
    if "short_vs_idle" in rounds[0][REFERENCE]:
        for m in modes:
            rs = [rd[m] for rd in rounds]
            d = {}
            for key, (a, b) in {"short_vs_idle": ("short_ttft_p99", "short_idle_ttft_p99"),
                                "long_vs_alone": ("long_ttft", "long_alone_ttft")}.items():
                va, vb = [r[a] for r in rs], [r[b] for r in rs]
                ok = all(x > 0 for x in va + vb)
                d[key] = ({"median": paired_median(va, vb), "ci90": paired_ci(va, vb),
                           "target": HOL_TARGETS[key]} if ok else None)
                d[a] = percentile(va, 50)
                d[b] = percentile(vb, 50)
            hol[m] = d

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
    return {"modes": list(modes), "pooled": pooled, "vs_off": vs_off, "best_fixed": best,
            "vs_best_fixed": vs_best, "best_threshold": best_thr,
            "vs_best_threshold": vs_best_thr, "hol": hol,
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
    print(f"{'mode':<16}{'in tok/s':>9}{'req/s':>7}{'TTFT p50':>9}{'p99':>7}"
          f"{'ITL p50':>8}{'p99':>7}   {'tput/off (90% CI)':<21}{'TTFT p50/off':<21}"
          f"{'ITL p99/off':<21}")
    for m in modes:
        p = s["pooled"][m]
        r = s["vs_off"].get(m, {})
        mark = " *" if m in (s["best_fixed"], s["best_threshold"]) else ""
        print(f"{label(m) + mark:<16}{p['input_tput']:>9.0f}{p['req_s']:>7.2f}"
              f"{p['ttft_p50']:>9.3f}{p['ttft_p99']:>7.3f}"
              f"{1e3 * p['itl_p50']:>8.1f}{1e3 * p['itl_p99']:>7.1f}   "
              f"{fmt_ratio(r.get('input_tput')) if m != REFERENCE else '1':<21}"
              f"{fmt_ratio(r.get('ttft_p50')) if m != REFERENCE else '1':<21}"
              f"{fmt_ratio(r.get('itl_p99')) if m != REFERENCE else '1':<21}")
    print(f"(TTFT s, ITL ms, pooled over rounds; * = best fixed chunk / best threshold "
          f"server by {wl.primary}; 'vLLM thr N': a server with --long-prefill-token-threshold"
          f" N, dcpp off, its ratios to the dcpp server's 'off'; greedy outputs identical: "
          f"{s['greedy_identical']} ({s['greedy_compared']} compared); all completed: "
          f"{s['all_completed']})")
    if s.get("hol"):
        print(f"head-of-line, per mode against its own idle runs of the same round (median "
              f"over rounds, 90% CI): short requests' TTFT p99 hol / idle (target <= "
              f"{HOL_TARGETS['short_vs_idle']}), long prompt's TTFT hol / alone (target <= "
              f"{HOL_TARGETS['long_vs_alone']})")
        print(f"{'mode':<16}{'short p99 hol':>14}{'idle':>7}   {'hol/idle':<22}"
              f"{'long hol':>9}{'alone':>7}   {'hol/alone':<22}{'short p99/off':<21}"
              f"{'long/off':<21}")
        for m in modes:
            h = s["hol"][m]
            r = s["vs_off"].get(m, {})
            print(f"{label(m):<16}{h['short_ttft_p99']:>14.3f}{h['short_idle_ttft_p99']:>7.3f}"
                  f"   {fmt_target(h['short_vs_idle']):<22}{h['long_ttft']:>9.3f}"
                  f"{h['long_alone_ttft']:>7.3f}   {fmt_target(h['long_vs_alone']):<22}"
                  f"{fmt_ratio(r.get('short_ttft_p99')) if m != REFERENCE else '1':<21}"
                  f"{fmt_ratio(r.get('long_ttft')) if m != REFERENCE else '1':<21}")
        print("(seconds: medians over rounds)")


def fmt_target(d: dict | None) -> str:
    if not d:
        return "-"
    return fmt_ratio(d) + (" ok" if d["median"] <= d["target"] else " MISS")


def headline(summary: dict) -> list[dict]:
    """dcpp default vs the best fixed chunk, beside vLLM's default, per workload."""
    rows = []
    for name, s in summary.items():
        wl = WORKLOADS[name]
        k = wl.primary
        thr = s["best_threshold"]
        row = {"workload": name, "metric": k, "best_fixed": s["best_fixed"],
               "dcpp_vs_off": s["vs_off"].get("pipeline", {}).get(k),
               "equal_time_vs_off": s["vs_off"].get("equal_time", {}).get(k),
               "best_fixed_vs_off": (s["vs_off"].get(s["best_fixed"], {}).get(k)
                                     if s["best_fixed"] else None),
               "dcpp_vs_best_fixed": s["vs_best_fixed"].get("pipeline", {}).get(k),
               "equal_time_vs_best_fixed": s["vs_best_fixed"].get("equal_time", {}).get(k),
               "best_threshold": thr,
               "best_threshold_vs_off": s["vs_off"].get(thr, {}).get(k) if thr else None,
               "dcpp_vs_best_threshold": s["vs_best_threshold"].get("pipeline", {}).get(k)}
        if s.get("hol"):
            row["hol"] = {m: {key: s["hol"][m][key] for key in HOL_TARGETS}
                          for m in s["hol"]}
        if k != "ttft_p50":
            row["dcpp_ttft_p50_vs_off"] = s["vs_off"].get("pipeline", {}).get("ttft_p50")
            row["dcpp_itl_p99_vs_off"] = s["vs_off"].get("pipeline", {}).get("itl_p99")
        rows.append(row)
    return rows


def print_headline(rows: list[dict]) -> None:
    print("\n== headline: paired median ratio over rounds (90% bootstrap interval); "
          "TTFT: lower is better, input throughput: higher is better ==")
    print(f"{'workload':<13}{'metric':<15}{'best fixed':<11}{'dcpp/best fixed':<22}"
          f"{'dcpp/vLLM':<22}{'best fixed/vLLM':<22}{'equal-time/vLLM':<22}{'best thr':<9}"
          f"{'dcpp/best thr':<22}{'best thr/vLLM':<22}")
    for r in rows:
        print(f"{r['workload']:<13}{r['metric']:<15}"
              f"{(r['best_fixed'] or '-').replace('fixed-', ''):<11}"
              f"{fmt_ratio(r['dcpp_vs_best_fixed']):<22}{fmt_ratio(r['dcpp_vs_off']):<22}"
              f"{fmt_ratio(r['best_fixed_vs_off']):<22}{fmt_ratio(r['equal_time_vs_off']):<22}"
              f"{(r['best_threshold'] or '-').replace('lpt-', ''):<9}"
              f"{fmt_ratio(r['dcpp_vs_best_threshold']):<22}"
              f"{fmt_ratio(r['best_threshold_vs_off']):<22}")
    for r in rows:
        if r.get("hol"):
            h = r["hol"]
            picks = [m for m in ("off", "pipeline", r["best_fixed"], r["best_threshold"])
                     if m and m in h]
            print(f"{r['workload']}: short TTFT p99 / idle (target <= 2), long TTFT / alone "
                  f"(target <= 1.05): " + "; ".join(
                      f"{label(m)} {fmt_target(h[m]['short_vs_idle'])}, "
                      f"{fmt_target(h[m]['long_vs_alone'])}" for m in picks))
    for r in rows:
        if "dcpp_ttft_p50_vs_off" in r:
            print(f"{r['workload']}: dcpp TTFT p50/vLLM {fmt_ratio(r['dcpp_ttft_p50_vs_off'])},"
                  f" ITL p99/vLLM {fmt_ratio(r['dcpp_itl_p99_vs_off'])}")


def plot(summary: dict, modes: list[str], path: Path) -> None:
    """Paired ratios to vLLM's per mode and workload (input throughput, TTFT p50); with the
    hol workload a third panel: its two ratios against idle runs, and their targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    hol = [n for n in names if summary[n].get("hol")]
    fig, axes = plt.subplots(1, 3 if hol else 2, figsize=(18 if hol else 12, 4.4))
    width = 0.8 / len(modes)

    def bar(ax, x, d, width, **kw):
        v = d["median"] if d else float("nan")
        ci = d["ci90"] if d else (v, v)
        lo = v - ci[0] if ci[0] == ci[0] else 0
        hi = ci[1] - v if ci[1] == ci[1] else 0
        ax.bar(x, v, width, yerr=[[lo], [hi]], capsize=2, **kw)

    for ax, key, title in ((axes[0], "input_tput", "input throughput / vLLM's (higher: better)"),
                           (axes[1], "ttft_p50", "TTFT p50 / vLLM's (lower: better)")):
        for j, m in enumerate(modes):
            color = f"C{j % 10}"
            for i, n in enumerate(names):
                if m not in summary[n]["pooled"]:
                    continue
                x = i + (j - (len(modes) - 1) / 2) * width
                if m == REFERENCE:
                    ax.bar(x, 1.0, width, color=color, label=label(m) if i == 0 else None)
                    continue
                bar(ax, x, summary[n]["vs_off"].get(m, {}).get(key), width, color=color,
                    label=label(m) if i == 0 else None)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7, ncol=2)
    if hol:
        ax = axes[2]
        h = summary[hol[0]]["hol"]
        hm = [m for m in modes if m in h]
        w = 0.4
        for k, (key, what) in enumerate((("short_vs_idle", "short TTFT p99 / idle"),
                                         ("long_vs_alone", "long TTFT / alone"))):
            for j, m in enumerate(hm):
                bar(ax, j + (k - 0.5) * w, h[m][key], w, color=f"C{k}",
                    label=what if j == 0 else None)
        for key, style in (("short_vs_idle", "--"), ("long_vs_alone", ":")):
            ax.axhline(h[hm[0]][key]["target"] if h[hm[0]][key] else 1.0, color="k",
                       ls=style, lw=0.8)
        ax.set_xticks(np.arange(len(hm)), [label(m) for m in hm], rotation=45, ha="right",
                      fontsize=7)
        ax.set_title(f"{hol[0]}: against idle runs (targets: dashed 2x, dotted 1.05x)",
                     fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle("dcpp serve_load: paired median ratio per mode and workload (90% bootstrap "
                 "interval), PP=2 CPU; 'vLLM thr N': own server", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
