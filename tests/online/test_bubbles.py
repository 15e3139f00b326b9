"""Measured bubbles (`dcpp.online.bubbles`): hand oracles of the idle fraction, and the
tracker's rules for which prefills can be measured (untimed steps, steps in flight, other
requests' steps, restarts, aborts, the full-timing sampling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpp.online.bubbles import (
    BubbleTracker,
    bubble_fraction,
    prefill_window,
    stage_idle_fractions,
    summarize,
)
from dcpp.chunker.simulate import simulate_times

# Hand oracle: 2 stages, 3 chunks; stage 0 takes 1, 1, 2 s and stage 1 takes 1, 1, 1 s.
#   stage 0: [0,1] [1,2] [2,4]            busy 4 of 5 s -> idle 0.2
#   stage 1:       [1,2] [2,3]   [4,5]    busy 3 of 5 s -> idle 0.4 (waits 3..4 for chunk 2)
# window [0, 5]; bubble fraction (0.2 + 0.4) / 2 = 0.3.
STARTS = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 4.0]])  # [step, stage] s
ENDS = np.array([[1.0, 2.0], [2.0, 3.0], [4.0, 5.0]])


def test_hand_oracle_two_stages():
    window = prefill_window(STARTS, ENDS)
    assert window == (0.0, 5.0)
    assert stage_idle_fractions(STARTS, ENDS, window) == pytest.approx([0.2, 0.4])
    assert bubble_fraction(STARTS, ENDS, window) == pytest.approx(0.3)


def test_same_as_the_simulators_bubble_for_one_request():
    res = simulate_times(np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]))
    assert res.bubble_fraction == pytest.approx(0.3)
    bars = np.array(res.timeline)  # (stage, chunk, start, end), sorted by stage then chunk
    starts = bars[:, 2].reshape(2, 3).T
    ends = bars[:, 3].reshape(2, 3).T
    assert starts == pytest.approx(STARTS) and ends == pytest.approx(ENDS)


@settings(max_examples=40, deadline=None)
@given(s=st.lists(st.floats(0.01, 3.0), min_size=1, max_size=8), p=st.integers(1, 5))
def test_matches_simulator_on_identical_stages(s, p):
    res = simulate_times(np.tile(s, (p, 1)))
    bars = np.array(res.timeline)
    starts, ends = bars[:, 2].reshape(p, -1).T, bars[:, 3].reshape(p, -1).T
    got = bubble_fraction(starts, ends, prefill_window(starts, ends))
    assert got == pytest.approx(res.bubble_fraction, abs=1e-9)


def test_overlapping_and_clipped_intervals_count_once():
    # One stage; window [1, 5]: [0, 2] clipped to [1, 2]; [1.5, 3] overlaps it; [4, 9] clipped
    # to [4, 5]. Busy = [1, 3] + [4, 5] = 3 of 4 s.
    starts = np.array([[0.0], [1.5], [4.0]])
    ends = np.array([[2.0], [3.0], [9.0]])
    assert stage_idle_fractions(starts, ends, (1.0, 5.0)) == pytest.approx([0.25])
    # A step wholly outside the window counts nothing.
    assert stage_idle_fractions(np.array([[6.0]]), np.array([[7.0]]), (1.0, 5.0)) == [1.0]


@pytest.mark.parametrize("starts, ends, window, match", [
    (np.zeros((2, 2)), np.zeros((3, 2)), (0, 1), "one shape"),
    (np.zeros(2), np.zeros(2), (0, 1), "num_steps, num_stages"),
    (np.ones((1, 1)), np.zeros((1, 1)), (0, 1), "end >= start"),
    (np.zeros((1, 1)), np.ones((1, 1)), (1, 1), "t1 > t0"),
])
def test_bad_input(starts, ends, window, match):
    with pytest.raises(ValueError, match=match):
        stage_idle_fractions(starts, ends, window)


# ------------------------------------------------------------------------------ tracker
def _feed(tr, steps, *, untimed=(), returned_before=None):
    """Run `steps` through the tracker as an engine with 2 stages would: each is (prefills,
    finishing, starts, ends); outputs come back one step behind (2 in flight), the last ones at
    the end; spans are collected (drained) after every second step."""
    pending = []
    for i, (prefills, finishing, starts, ends) in enumerate(steps):
        timed = i not in untimed
        tr.step(i, timed, prefills, finishing, labels={r: "pipeline" for r in prefills})
        if timed:
            pending.append((i, starts, ends))
        if i >= 1:
            tr.returned(i - 1)
        if i % 2 == 1:
            for j, a, b in pending:
                tr.spans(j, a, b)
            tr.resolved(i)
            pending = []
    for j, a, b in pending:
        tr.spans(j, a, b)
    tr.resolved(len(steps) - 1)
    tr.returned(len(steps) - 1)


HAND_STEPS = [
    ({"a": (100, 0)}, [], STARTS[0], ENDS[0]),
    ({"a": (100, 100)}, [], STARTS[1], ENDS[1]),
    ({"a": (200, 200)}, ["a"], STARTS[2], ENDS[2]),
]


def test_tracker_measures_the_hand_oracle():
    got = []
    tr = BubbleTracker(on_result=got.append)
    _feed(tr, HAND_STEPS)
    assert len(got) == 1 and tr.num_measured == 1 and tr.num_unmeasured == 0
    r = got[0]
    assert r.request_id == "a" and r.label == "pipeline" and r.chunks == (100, 100, 200)
    assert r.fraction == pytest.approx(0.3) and r.stage_idle == pytest.approx((0.2, 0.4))
    assert r.window_s == pytest.approx(5.0) and r.other_steps == 0
    assert sorted(r.bars)[:2] == [(0, 0, 0.0, 1.0), (0, 1, 1.0, 2.0)]
    assert summarize(tr.results)["pipeline"]["mean"] == pytest.approx(0.3)


@pytest.mark.parametrize("untimed", [0, 1, 2])
def test_an_untimed_step_of_the_prefill_leaves_it_unmeasured(untimed):
    got = []
    tr = BubbleTracker(on_result=got.append)
    _feed(tr, HAND_STEPS, untimed={untimed})
    assert got == [] and tr.num_unmeasured == 1


def _two_requests(t):
    """Request "b" (one 1 s chunk per stage) is in flight when "a" starts at t = 1 + t."""
    b = ({"b": (50, 0)}, ["b"], np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    a0 = ({"a": (100, 0)}, [], np.array([1.0, 2.0]) + t, np.array([2.0, 3.0]) + t)
    a1 = ({"a": (100, 100)}, ["a"], np.array([2.0, 3.0]) + t, np.array([3.0, 4.0]) + t)
    return [b, a0, a1]


def test_a_step_in_flight_at_the_start_counts_as_busy():
    # b runs on stage 1 during [1, 2] while a's first chunk runs on stage 0: window [1, 4];
    # stage 0 busy [1, 3] (2/3), stage 1 busy [1, 2] (b) + [2, 4] = 3/3 -> bubble (1/3 + 0)/2.
    got = []
    tr = BubbleTracker(on_result=got.append)
    _feed(tr, _two_requests(0.0))
    assert [r.request_id for r in got] == ["b", "a"]
    a = got[1]
    assert a.stage_idle == pytest.approx((1 / 3, 0.0)) and a.other_steps == 1
    # Untimed, that step's share is unknown: "a" is not measured.
    got.clear()
    tr = BubbleTracker(on_result=got.append)
    _feed(tr, _two_requests(0.0), untimed={0})
    assert got == [] and tr.num_unmeasured == 2


def test_a_step_returned_before_the_first_chunk_is_not_needed():
    # "b" finished (output back) before "a" was scheduled: its timing does not matter.
    got = []
    tr = BubbleTracker(on_result=got.append)
    b, a0, a1 = _two_requests(5.0)
    tr.step(0, False, b[0], b[1])
    tr.resolved(0)
    tr.returned(0)
    for i, (pre, fin, s, e) in enumerate((a0, a1), start=1):
        tr.step(i, True, pre, fin)
        tr.spans(i, s, e)
    tr.resolved(2)
    tr.returned(1)
    assert got == []  # "a" is still open until its last step's output is back
    tr.returned(2)
    assert [r.request_id for r in got] == ["a"]
    assert got[0].stage_idle == pytest.approx((1 / 3, 1 / 3))  # 2 chunks of 1 s, P=2: fill/drain


def test_a_step_scheduled_before_the_last_output_returned_counts():
    # Request "c" is scheduled (step 2) while a's last step (1) is in flight: it runs on
    # stage 0 during [3, 4], inside a's window [1, 4] -> stage 0 is busy all the time.
    tr = BubbleTracker()
    a0 = ({"a": (100, 0)}, [], np.array([1.0, 2.0]), np.array([2.0, 3.0]))
    a1 = ({"a": (100, 100)}, ["a"], np.array([2.0, 3.0]), np.array([3.0, 4.0]))
    c = ({"c": (10, 0)}, ["c"], np.array([3.0, 4.0]), np.array([4.0, 4.5]))
    for i, (pre, fin, s, e) in enumerate((a0, a1, c)):
        tr.step(i, True, pre, fin)
        tr.spans(i, s, e)
    tr.resolved(2)
    tr.returned(0)
    tr.returned(1)
    (a,) = [r for r in tr.results if r.request_id == "a"]
    assert a.stage_idle == pytest.approx((0.0, 1 / 3)) and a.other_steps == 1


def test_restart_after_preemption_measures_the_rerun():
    got = []
    tr = BubbleTracker(on_result=got.append)
    tr.step(0, True, {"a": (100, 0)}, labels={"a": "off"})
    tr.spans(0, [0.0, 1.0], [1.0, 2.0])
    # Preempted; recomputed from scratch: history goes back to 0.
    tr.step(1, True, {"a": (200, 0)}, ["a"])
    tr.spans(1, [10.0, 11.0], [11.0, 12.0])
    tr.resolved(1)
    tr.returned(0)
    tr.returned(1)
    assert tr.num_unmeasured == 1 and len(got) == 1
    assert got[0].chunks == (200,) and got[0].label == "off"  # the label survives the restart
    assert got[0].window_s == pytest.approx(2.0) and got[0].fraction == pytest.approx(0.5)


def test_forget_drops_an_aborted_prefill():
    tr = BubbleTracker(sample_every=1)
    tr.step(0, True, {"a": (100, 0)})
    assert tr.full_timing
    tr.forget(["a"])
    assert tr.num_unmeasured == 1 and not tr._open
    tr.step(1, True, {"b": (100, 0)})
    tr.forget(None)
    assert tr.num_unmeasured == 2


def test_a_request_freed_after_its_last_prefill_step_is_still_measured():
    """vLLM frees a request (a 1-token answer, or a prefill-only request) before dcpp sees its
    last step's output: the window closes on that output all the same."""
    tr = BubbleTracker(sample_every=1)
    tr.step(0, True, {"a": (100, 0)}, finishing=["a"], labels={"a": "pipeline"})
    tr.forget(["a"])  # freed in update_from_output, before the output reaches the tracker
    tr.spans(0, [0.0, 1.0], [1.0, 2.0])
    tr.resolved(0)
    tr.returned(0)
    assert tr.num_measured == 1 and tr.num_unmeasured == 0
    assert tr.results[-1].request_id == "a"


def test_out_of_order_steps_are_rejected():
    tr = BubbleTracker()
    tr.step(3, True, {})
    with pytest.raises(ValueError, match="increasing order"):
        tr.step(3, True, {})


def test_sampling_holds_full_timing_for_one_prefill_in_n():
    tr = BubbleTracker(sample_every=3)
    assert tr.armed and tr.full_timing  # the first prefill is measured
    index = 0

    def prefill(rid, timed=True):
        nonlocal index
        tr.step(index, timed, {rid: (100, 0)}, [rid])
        tr.spans(index, [index, index + 1.0], [index + 1.0, index + 2.0])
        tr.resolved(index)
        held = tr._open[rid].held
        tr.returned(index)
        index += 1
        return held

    assert prefill("r0") is True and not tr.full_timing  # window closed: rate back
    assert [prefill(f"r{i}") for i in (1, 2)] == [False, False]
    assert tr.armed  # the third prefill after the sampled one
    assert prefill("r3") is True
    # A prefill starting on an untimed step is not held: the tracker stays armed.
    assert [prefill(f"r{i}") for i in (4, 5)] == [False, False] and tr.armed
    assert prefill("r6", timed=False) is False and tr.armed
    assert tr.num_measured == 6 and tr.num_unmeasured == 1


def test_sampling_off_never_asks_for_timing_and_stalled_holds_lapse():
    tr = BubbleTracker(sample_every=0)
    assert not tr.full_timing
    tr.step(0, True, {"a": (100, 0)})
    assert not tr.full_timing
    tr = BubbleTracker(sample_every=2, hold_gap=3)
    tr.step(0, True, {"a": (100, 0)})
    assert tr._open["a"].held and tr.full_timing
    for i in range(1, 4):  # "a" is not scheduled again (starved or preempted)
        tr.step(i, True, {})
    assert not tr._open["a"].held and not tr.full_timing


def test_a_sampled_prefill_lost_to_an_untimed_step_rearms():
    tr = BubbleTracker(sample_every=3)
    tr.step(0, True, {"a": (100, 0)})
    assert tr._open["a"].held and not tr.armed
    tr.step(1, False, {"a": (100, 100)}, ["a"])  # the new rate had not reached the workers
    tr.spans(0, [0.0, 1.0], [1.0, 2.0])
    tr.resolved(1)
    tr.returned(0)
    tr.returned(1)
    assert tr.num_unmeasured == 1 and tr.armed  # the next prefill is sampled instead
