"""Pipeline simulator: closed form for identical stages, event simulation for unequal ones."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LLAMA8B_P4
from dcpp.chunker.simulate import simulate, simulate_times

times = st.lists(st.floats(0.0, 5.0), min_size=1, max_size=12)


@settings(max_examples=50, deadline=None)
@given(s=times, p=st.integers(1, 8))
def test_identical_stages_match_closed_form(s, p):
    res = simulate_times(np.tile(s, (p, 1)))
    assert res.ttft == pytest.approx(sum(s) + (p - 1) * max(s), abs=1e-9)
    work = p * sum(s)
    if res.ttft > 0:
        assert res.bubble_fraction == pytest.approx(1 - work / (p * res.ttft), abs=1e-9)
    assert res.stage_busy == pytest.approx([sum(s)] * p)


def _event_simulation(s: np.ndarray) -> tuple[float, dict]:
    """Discrete-event simulation: stages are servers taking chunks in order from a queue."""
    p, k = s.shape
    queue = [[] for _ in range(p)]  # ready chunk indices per stage
    queue[0] = list(range(k))
    busy_until = [0.0] * p
    running = [None] * p
    events: list[tuple[float, int]] = []  # (time, stage) completions
    spans = {}
    now = 0.0

    def dispatch(t):
        for i in range(p):
            if running[i] is None and queue[i]:
                j = queue[i].pop(0)
                running[i] = j
                busy_until[i] = t + s[i, j]
                spans[(i, j)] = (t, t + s[i, j])
                heapq.heappush(events, (busy_until[i], i))

    dispatch(0.0)
    while events:
        now, i = heapq.heappop(events)
        j, running[i] = running[i], None
        if i + 1 < p:
            queue[i + 1].append(j)
            queue[i + 1].sort()
        dispatch(now)
    return now, spans


@settings(max_examples=50, deadline=None)
@given(p=st.integers(1, 6), k=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_unequal_stages_match_event_simulation(p, k, seed):
    s = np.random.default_rng(seed).uniform(0.1, 3.0, size=(p, k))
    res = simulate_times(s)
    ttft, spans = _event_simulation(s)
    assert res.ttft == pytest.approx(ttft)
    for stage, chunk, start, end in res.timeline:
        assert (start, end) == pytest.approx(spans[(stage, chunk)])


def test_slowest_stage_sets_the_pace():
    plan = [4096] * 8
    fast = lambda c, h: LLAMA8B_P4.predict_time(c, h)  # noqa: E731
    slow = lambda c, h: 1.5 * LLAMA8B_P4.predict_time(c, h)  # noqa: E731
    even = simulate(plan, fast, 4)
    uneven = simulate(plan, [fast, slow, fast, fast], 4)
    assert uneven.ttft > even.ttft
    assert uneven.ttft >= sum(slow(4096, 4096 * i) for i in range(8))
    assert uneven.stage_busy[1] == pytest.approx(1.5 * uneven.stage_busy[0])
    assert len(uneven.timeline) == 4 * 8


def test_history_and_model_objects_accepted():
    a = simulate([1000, 1000], LLAMA8B_P4, 2, history=5000)
    s0 = LLAMA8B_P4.predict_time(1000, 5000)
    s1 = LLAMA8B_P4.predict_time(1000, 6000)
    assert a.ttft == pytest.approx(s0 + s1 + max(s0, s1))


def test_in_flight_limit():
    s = np.ones((3, 5))
    assert simulate_times(s, max_in_flight=3).ttft == simulate_times(s).ttft
    assert simulate_times(s, max_in_flight=1).ttft == pytest.approx(15.0)  # no overlap at all


def test_bad_inputs():
    with pytest.raises(ValueError, match="got 2 stage latencies for num_stages=3"):
        simulate([10], [LLAMA8B_P4, LLAMA8B_P4], 3)
    with pytest.raises(ValueError, match="plan must be"):
        simulate([], LLAMA8B_P4, 2)
    with pytest.raises(ValueError, match="num_stages"):
        simulate([10], LLAMA8B_P4, 0)
    with pytest.raises(ValueError, match="callable"):
        simulate([10], 3.0, 2)
