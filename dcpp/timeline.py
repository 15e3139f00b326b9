"""Pipeline timeline pictures: stage x time, one bar per chunk, bubbles visible as gaps.

Input is engine-agnostic: for each named plan, a list of ``Bar(stage, chunk, start, end)`` in
seconds, from the simulator (``dcpp.chunker.simulate``) or from a measured run
(``dcpp.online.bubbles.PrefillBubble``: `bars_from_measured`). Panels share the time axis so
static and dynamic plans, simulated and measured, compare at a glance (``ncols=2`` puts them
side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Bar:
    """One chunk's compute interval on one pipeline stage."""

    stage: int
    chunk: int
    start: float
    """Seconds from the start of the prefill."""
    end: float
    """Seconds from the start of the prefill."""


def check_bars(name: str, bars: Sequence[Bar]) -> None:
    if not bars:
        raise ValueError(f"timeline {name!r} has no bars; expected at least one chunk")
    for b in bars:
        if b.stage < 0 or b.chunk < 0 or not (b.end >= b.start >= 0):
            raise ValueError(f"timeline {name!r}: bad bar {b}; expected stage, chunk >= 0 and "
                             "0 <= start <= end")


def draw_timeline(timelines: Mapping[str, Sequence[Bar]], out: str | Path, *,
                  title: str = "Pipeline timeline", unit: str = "ms",
                  ncols: int = 1) -> list[Path]:
    """Draw one panel per plan (row by row, ``ncols`` panels a row) and write ``out`` with
    suffixes .png and .svg; return both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not timelines:
        raise ValueError("timelines is empty; pass at least one {name: bars} entry")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols={ncols!r} must be an int >= 1")
    for name, bars in timelines.items():
        check_bars(name, bars)
    scale = {"s": 1.0, "ms": 1e3}[unit]
    num_stages = max(b.stage for bars in timelines.values() for b in bars) + 1
    horizon = max(b.end for bars in timelines.values() for b in bars) * scale
    cmap = plt.get_cmap("tab20")
    ncols = min(ncols, len(timelines))
    nrows = -(-len(timelines) // ncols)
    fig, axes = plt.subplots(nrows, ncols, sharex=True, squeeze=False,
                             figsize=(10 if ncols == 1 else 7 * ncols,
                                      1.0 + 0.6 * num_stages * nrows))
    for ax in axes.flat[len(timelines):]:
        ax.set_visible(False)
    for ax, (name, bars) in zip(axes.flat, timelines.items()):
        span = max(b.end for b in bars)
        busy = sum(b.end - b.start for b in bars)
        bubble = 1 - busy / (num_stages * span) if span > 0 else 0.0
        for b in bars:
            (rect,) = ax.barh(b.stage, (b.end - b.start) * scale, left=b.start * scale,
                              height=0.8, color=cmap(b.chunk % 20), edgecolor="black",
                              linewidth=0.5)
            rect.set_gid(f"{name}-stage{b.stage}-chunk{b.chunk}")  # findable in the SVG
            if (b.end - b.start) * scale > horizon / 40:
                ax.text((b.start + b.end) / 2 * scale, b.stage, str(b.chunk), ha="center",
                        va="center", fontsize=7)
        ax.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
        ax.set_ylim(num_stages - 0.5, -0.5)
        ax.set_title(f"{name}: TTFT {span * scale:.4g} {unit}, bubbles {bubble:.1%}",
                     fontsize=9, loc="left")
        ax.set_xlim(0, horizon * 1.02)
    for ax in axes[-1, :]:
        ax.set_xlabel(f"time ({unit}); bar label = chunk index")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep SVG text as text
        for p in paths:
            fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths


def bars_from_stage_times(stage_times: Sequence[Sequence[float]]) -> list[Bar]:
    """Bars of chunks run in order through the stages with measured compute times [chunk][stage]:
    each chunk starts on a stage when both it left the previous stage and the stage is free."""
    import numpy as np

    from dcpp.chunker.simulate import simulate_times

    return bars_from_sim(simulate_times(np.asarray(stage_times, dtype=float).T))


def bars_from_measured(result) -> list[Bar]:
    """Bars of a measured prefill (``dcpp.online.bubbles.PrefillBubble``): its own steps on
    each stage, from the workers' step start/end times, seconds from its first chunk's start."""
    return [Bar(stage, chunk, max(0.0, start), max(0.0, end))
            for stage, chunk, start, end in result.bars]


def bars_from_sim(result) -> list[Bar]:
    """Bars of a ``dcpp.chunker.simulate.SimResult``."""
    return [Bar(stage, chunk, start, end) for stage, chunk, start, end in result.timeline]
