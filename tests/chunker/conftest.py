"""Synthetic latency models for the chunker tests (DESIGN.md §5.10)."""

from __future__ import annotations

import numpy as np
import pytest

from dcpp.chunker.latency_model import HistoryLatencyModel

# Llama-3.1-8B-like per-stage costs on one H100 at 50% MFU, PP=4 (seconds, tokens).
LLAMA8B_P4 = HistoryLatencyModel(alpha=1.32e-10, beta=2.65e-10, gamma=7.1e-6, delta=0.0,
                                 c=0.003)
# A model with prefix work (delta > 0) and a non-causal in-chunk term, for misspecification.
PREFIX_HEAVY = HistoryLatencyModel(alpha=3e-10, beta=2e-10, gamma=5e-6, delta=4e-7, c=0.004)


def noisy_timer(model: HistoryLatencyModel, noise: float = 0.01, seed: int = 0,
                outliers: dict[int, float] | None = None):
    """timed_forward(num_tokens, history) of ``model`` with multiplicative noise; call number i
    in ``outliers`` is multiplied by outliers[i]. Counts calls in .calls."""
    rng = np.random.default_rng(seed)
    outliers = outliers or {}

    def timed_forward(num_tokens: int, history: int) -> float:
        i = timed_forward.calls
        timed_forward.calls += 1
        t = float(model.predict_time(num_tokens, history)) * (1 + noise * rng.standard_normal())
        return t * outliers.get(i, 1.0)

    timed_forward.calls = 0
    return timed_forward


@pytest.fixture
def llama_model() -> HistoryLatencyModel:
    return LLAMA8B_P4
