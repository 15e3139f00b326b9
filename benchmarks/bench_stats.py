"""Statistics shared by the vLLM benchmarks (`vllm_ttft.py`, `serve_load.py`): paired ratios
of rounds run back to back in one engine, and bootstrap intervals of their median."""

from __future__ import annotations

import statistics


def paired_median(values, reference) -> float:
    """Median over rounds of values[i] / reference[i] (each round's ratio to its own
    reference run cancels the slow drifts of a shared machine)."""
    return statistics.median(a / b for a, b in zip(values, reference))


def paired_ci(values, static, level=0.90):
    """Bootstrap interval (percentile, over rounds) of the median per-round ratio
    values[i] / static[i]: how far the headline could move with other rounds of this noise."""
    import numpy as np
    from scipy.stats import bootstrap

    ratios = np.asarray(values) / np.asarray(static)
    if len(ratios) < 3:
        return (float("nan"), float("nan"))
    ci = bootstrap((ratios,), np.median, confidence_level=level, method="percentile",
                   n_resamples=2000, random_state=0).confidence_interval
    return (float(ci.low), float(ci.high))
