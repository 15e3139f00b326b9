"""`ChunkSizer` on its own (no vLLM): dcpp changes chunk sizes, never which requests run."""

from __future__ import annotations

import pytest

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.chunker.planning_model import PlanningModel
from dcpp.online.chunk_sizer import PLAN_OFF, Ask, ChunkSizer, water_level
from dcpp.online.requests import RequestTable

# 2 ms per step, 1 us per token, attention 4e-9 per token pair.
MODEL = HistoryLatencyModel(alpha=2e-9, beta=4e-9, gamma=1e-6, delta=0.0, c=2e-3)


class CountingPlanner:
    """Hand-made plans: 512-token chunks (the last one the rest); counts its calls."""

    def __init__(self, chunk=512):
        self.chunk, self.calls = chunk, []

    def __call__(self, mode, n, history):
        self.calls.append((mode, n, history))
        return [self.chunk] * (n // self.chunk) + ([n % self.chunk] if n % self.chunk else [])


def new_sizer(planner, **kw):
    return ChunkSizer(planner, PlanningModel(MODEL), RequestTable(), **kw)


def sizer(floor=128, align=64, chunk=512):
    planner = CountingPlanner(chunk)
    return new_sizer(planner, floor=floor, align=align), planner


def take(s, a):
    """vLLM asks for `a` and takes dcpp's number (it commits what the hook returned)."""
    got = s.size(a)
    s.commit(a.request_id, a.history, got)
    return got


def plan_of(s, rid):
    state = s.requests.get(rid)
    return state.plan if state is not None else None


def ask(rid, total, history=0, offered=4096, **kw):
    return Ask(request_id=rid, mode=kw.pop("mode", "pipeline"), total=total, history=history,
               offered=min(offered, total - history), **kw)


def test_a_burst_of_short_requests_all_run_in_one_step():
    """vLLM offers 10 short requests in one step: every one is scheduled whole (requests up to
    the floor, min_chunk, are never split; vLLM's default budget keeps it >= 2048)."""
    s, _ = sizer(floor=512)
    s.begin_step(4096)
    got = [take(s, ask(f"r{i}", 10)) for i in range(10)]
    assert got == [10] * 10
    s.begin_step(4096)
    got = [take(s, ask(f"m{i}", 300)) for i in range(8)]
    assert got == [300] * 8


def test_later_prefills_get_the_floor_not_zero_and_never_more_than_offered():
    s, _ = sizer(floor=256)
    s.begin_step(4096)
    first = take(s, ask("long", 100_000, history=50_000))
    assert first == 512  # its plan's chunk sets the step's time
    # The step's time is spent (history 50k makes the first chunk slow, and the later plans'
    # chunks are faster); later prefills get the floor, a short one its whole prompt, a
    # request offered less gets what was offered.
    assert take(s, ask("b", 100_000)) >= 256
    assert take(s, ask("c", 200)) == 200
    assert take(s, ask("d", 100_000, offered=100)) == 100


def test_a_later_prefill_fills_the_remaining_time_exactly():
    """The step may take as long as the longest planned chunk of its prefills; a prefill
    sized after a short one fills the step up to its own planned chunk's time."""
    s, _ = sizer(floor=64, chunk=2048)
    s.begin_step(8192)
    assert take(s, ask("a", 2048 + 300, history=2048)) == 300  # a plan's short last chunk
    second = take(s, ask("b", 10_000, history=1024))  # plans 2048 now
    target = MODEL.predict_time(2048, 1024)
    # Hand oracle: the largest 64-aligned x with t([(300, 2048), (x, 1024)]) <= target.
    best = max(x for x in range(64, 2049, 64)
               if MODEL.predict_batch([(300, 2048), (x, 1024)]) <= target)
    assert second == best < 2048


def test_short_requests_first_do_not_starve_a_long_prefill():
    s, _ = sizer(floor=256, chunk=2048)
    s.begin_step(8192)
    assert [take(s, ask(f"s{i}", 10)) for i in range(10)] == [10] * 10
    assert take(s, ask("long", 20_000)) > 1800


def test_decodes_keep_their_room():
    """`begin_step` is told the budget minus the decodes' tokens; a prefill stays within it,
    and a second one past the room still runs, at the floor."""
    s, _ = sizer(floor=64)
    s.begin_step(300)
    assert take(s, ask("a", 5000)) == 300
    assert take(s, ask("b", 5000)) == 64


def test_off_requests_and_no_model_get_what_vllm_offers():
    s, planner = sizer()
    s.begin_step(4096)
    assert take(s, ask("a", 9000, mode=PLAN_OFF)) == 4096
    s.source.set(None)
    assert take(s, ask("b", 9000)) == 4096
    assert not planner.calls


def test_a_trimmed_chunk_continues_the_plan_without_replanning():
    s, planner = sizer()
    r = 2000  # plan: 512 512 512 464
    h = 0
    s.begin_step(4096)
    assert take(s, ask("a", r, h, offered=300)) == 300  # vLLM's budget cut the first chunk
    s.end_step()
    s.advance("a", h, 300)
    h = 300
    s.begin_step(4096)
    assert take(s, ask("a", r, h)) == 212  # the rest of the planned first chunk
    s.end_step()
    s.advance("a", h, 212)
    h = 512
    for want in (512, 512, 464):
        s.begin_step(4096)
        assert take(s, ask("a", r, h)) == want
        s.end_step()
        s.advance("a", h, want)
        h += want
    assert len(planner.calls) == 1
    # One plan, as made; the trimmed chunk's rest ran as the next chunk.
    assert s.requests.plan_log["a"] == [(0, [512, 512, 512, 464])]
    assert plan_of(s, "a") is None


def test_a_rest_below_the_alignment_joins_the_next_chunk():
    s, _ = sizer(chunk=512)  # plan 512 488
    s.begin_step(4096)
    take(s, ask("a", 1000))
    s.end_step()
    s.advance("a", 0, 500)  # 12 left of the first chunk: it joins the last one
    assert plan_of(s, "a").chunks == [500]
    assert s.requests.plan_log["a"] == [(0, [512, 488])]


def test_a_chunk_larger_than_planned_eats_into_the_next_planned_chunks():
    s, planner = sizer()  # plan 512 512 512 464
    s.begin_step(4096)
    take(s, ask("a", 2000, encoder_spans=((500, 300),)))  # took the image whole: 800
    s.end_step()
    s.advance("a", 0, 800)
    assert plan_of(s, "a").chunks == [224, 512, 464] and plan_of(s, "a").pos == 800
    assert s.requests.plan_log["a"] == [(0, [512, 512, 512, 464])]
    assert len(planner.calls) == 1


def test_a_prefix_hit_or_preemption_plans_again_from_where_the_request_is():
    s, planner = sizer()
    s.begin_step(4096)
    take(s, ask("a", 3000))
    s.end_step()
    s.advance("a", 0, 512)
    s.begin_step(4096)
    take(s, ask("a", 3000, history=256))  # preempted and resumed at 256
    assert planner.calls == [("pipeline", 3000, 0), ("pipeline", 2744, 256)]


def test_chunks_never_end_inside_an_encoder_input():
    """An image at [400, 700): a chunk from 0 planned to end at 512 takes the image whole when
    vLLM offered enough, else stops before it."""
    s, _ = sizer()
    s.begin_step(4096)
    assert take(s, ask("a", 3000, encoder_spans=((400, 300),))) == 700
    s.begin_step(4096)
    assert take(s, ask("b", 3000, offered=600, encoder_spans=((400, 300),))) == 400
    s.begin_step(4096)  # an image starting where the chunk starts is taken whole
    assert take(s, ask("c", 3000, history=400, encoder_spans=((400, 800),))) == 800


def test_a_fixed_chunk_size_takes_that_many_whatever_the_plan():
    """`dcpp_chunk_size`: min(fixed, offered) every step, no plan, encoder spans still kept;
    its time counts towards the step, so a dcpp prefill after it fits what is left."""
    s, planner = sizer(chunk=512)
    s.begin_step(4096)
    assert take(s, ask("f", 3000, offered=2048, fixed=1000)) == 1000
    assert planner.calls == []  # no plan for a fixed-size request
    after = take(s, ask("p", 3000))
    assert 128 <= after < 512  # the step's time is already t(1000): less than its own 512
    s.begin_step(4096)
    assert take(s, ask("f", 3000, history=1000, offered=600, fixed=1000)) == 600
    s.begin_step(4096)
    assert take(s, ask("g", 3000, fixed=450, encoder_spans=((400, 300),))) == 700  # whole
    s.begin_step(4096)
    assert take(s, ask("g", 3000, offered=600, fixed=450, encoder_spans=((400, 300),))) == 400
    s.source.set(None)  # no model yet: still the fixed size
    s.begin_step(4096)
    assert take(s, ask("h", 3000, fixed=256)) == 256


def test_mamba_alignment_ends_chunks_on_block_boundaries():
    s, _ = sizer(chunk=500)
    s.begin_step(4096)
    assert take(s, ask("a", 3000, block_align=128)) == 384
    s.begin_step(4096)  # the final chunk need not be aligned
    assert take(s, ask("b", 3000, history=2900, block_align=128)) == 100
    s.begin_step(4096)  # shorter than a block past a boundary: vLLM's offer stands
    assert take(s, ask("c", 3000, history=1000, offered=20, block_align=128)) == 20


@pytest.mark.parametrize("offered", [2, 3, 17, 511, 4096])
def test_never_zero_never_above_offered(offered):
    s, _ = sizer(floor=1024)
    s.begin_step(1)  # no room left in the step at all
    take(s, ask("first", 50_000, history=40_000))
    got = take(s, ask("x", 50_000, offered=offered))
    assert 1 <= got <= offered and got >= min(offered, 1024)


def test_water_level_fills_the_room_with_equal_shares_and_short_needs_whole():
    """sum_i min(n_i, L) == room, by hand."""
    assert water_level([16000, 300, 300, 500], 4096) == 4096 - 1100  # shorts whole
    assert water_level([10000] * 4, 4096) == 1024
    assert water_level([1000, 3000, 5000], 6000) == 2500  # 1000 + 2500 + 2500
    assert water_level([500] * 16 + [16000], 2048) == pytest.approx(2048 / 17)
    assert water_level([100, 200], 4096) == float("inf")  # all fit: everyone whole
    assert water_level([], 10) == float("inf")
    assert water_level([5000], 4096) == 4096


def test_under_load_a_long_prefill_takes_its_share_and_short_ones_run_whole():
    """Two running long prompts and a waiting short one, room 4096, P = 2: the other work
    covers each long prompt's drain, so each takes the water level of the room still free
    (aligned to 64), no plan; the short one runs whole in the same step."""
    s = new_sizer(CountingPlanner(512), floor=128, align=64, num_stages=2)
    pending = [("a", 16000, 1000), ("b", 16000, 1000), ("s", 300, 0)]
    s.begin_step(4096, lambda: pending)
    assert take(s, ask("a", 17000, 1000)) == 1856  # (4096 - 300) / 2 = 1898 -> 1856
    # Room 2240 left for b and s: (2240 - 300) / 1 = 1940 -> 1920.
    assert take(s, ask("b", 17000, 1000, offered=2240)) == 1920
    assert take(s, ask("s", 300, offered=320)) == 300
    assert s.num_shared == 3 and s.num_plans == 0


def test_a_waiting_long_prompt_takes_no_share_from_a_running_one():
    """A prompt not started yet (history 0: its prefix-cache hit is unknown, it may share the
    running one's prefix) counts only where it would run whole: here it would not, so the
    running prompt keeps vLLM's whole offer (the waiting one's work still covers its drain)."""
    s = new_sizer(CountingPlanner(512), floor=128, align=64, num_stages=2)
    s.begin_step(4096, lambda: [("a", 10000, 2000), ("w", 9000, 0)])
    assert take(s, ask("a", 12000, 2000)) == 4096 and s.num_shared == 1
    assert water_level([10000, 9000], 4096) == 2048  # the level had it counted


def test_a_planned_prefill_takes_at_most_its_share_beside_a_short_one():
    """A long prompt whose plan opens with 4096 tokens and a 1000-token request waiting: the
    short work does not cover the long one's drain, so the long one keeps its plan, capped at
    the level (4096 - 1000 -> 3072); the short one then fits whole; alone it takes its plan."""
    s = new_sizer(CountingPlanner(4096), floor=128, align=64, num_stages=2)
    pending = [("long", 16000, 0), ("s", 1000, 0)]
    s.begin_step(4096, lambda: pending)
    assert take(s, ask("long", 16000)) == 3072
    assert take(s, ask("s", 1000, offered=1024)) == 1000
    assert s.num_shared == 1 and s.num_plans == 1  # the long work covers the short's drain
    s.advance("long", 0, 3072)  # what the runtime does with the step's output
    s.begin_step(4096, lambda: [("long", 16000 - 3072, 3072)])
    assert take(s, ask("long", 16000, history=3072)) == 1024  # the plan's cut chunk's rest
    assert s.num_plans == 1


def test_a_pipeline_request_takes_its_share_while_other_work_covers_its_drain():
    """With P stages a prefill's last chunk keeps stages 1..P-1 busy for (P-1) x its time
    after stage 0 is done; other pending prefill work at least that long keeps stage 0 busy,
    so the request takes its share of the step (here all of vLLM's offer: both fit) and is not
    planned. Hand oracle on the model's times."""
    for p in (2, 4):
        s = new_sizer(CountingPlanner(512), floor=128, align=64, num_stages=p)
        last = 2048  # the request's last chunk at vLLM's size, ending at 6000
        drain = (p - 1) * MODEL.predict_time(last, 6000 - last)
        # Another prompt of n tokens from history 0 is predict_time(n, 0) seconds of work:
        # the smallest n that covers the drain, found by scanning.
        n_cover = next(n for n in range(1, 100_000) if MODEL.predict_time(n, 0) >= drain)
        for other, stands_aside in ((n_cover, True), (n_cover - 1, False)):
            pending = [("a", 6000, 0), ("b", other, 0)]
            s.begin_step(8192, lambda pending=pending: pending)
            got = take(s, ask("a", 6000, offered=2048))
            assert (got == 2048) is stands_aside, (p, other, got)
            assert (plan_of(s, "a") is not None) is not stands_aside
            s.requests.free(None)


def test_equal_time_keeps_its_plan_and_a_single_stage_plans_always():
    s, planner = sizer()
    pending = [("a", 6000, 0), ("b", 50_000, 0)]  # plenty of other work
    s.begin_step(8192, lambda: pending)
    assert take(s, ask("a", 6000, offered=2048, mode="equal_time")) == 512
    assert s.num_shared == 0  # `sizer()` builds a 1-stage sizer: no drain to cover
    s.begin_step(8192, lambda: pending)
    assert take(s, ask("c", 6000, offered=2048)) == 512
    s4 = new_sizer(planner, floor=128, align=64, num_stages=4)
    s4.begin_step(8192, lambda: pending)
    assert take(s4, ask("a", 6000, offered=2048, mode="equal_time")) == 512
    assert take(s4, ask("d", 6000, offered=2048)) == 2048 and s4.num_shared == 1


def test_pending_work_is_read_once_per_step_and_only_when_asked():
    s = new_sizer(CountingPlanner(512), floor=128, align=64, num_stages=2)
    calls = []

    def pending():
        calls.append(1)
        return [("a", 6000, 0)]

    s.begin_step(8192, pending)
    take(s, ask("x", 10))  # a request within the floor: no decision needed... but asked once
    take(s, ask("a", 6000, offered=2048))
    take(s, ask("y", 6000, offered=2048))
    assert len(calls) <= 1
    s.begin_step(8192, pending)
    take(s, ask("a", 6000, offered=2048, mode=PLAN_OFF))
    assert len(calls) <= 1  # "off" requests never read the queues


def test_a_plan_put_off_a_step_gives_the_same_chunks_one_step_later():
    """A request whose plan starts with the budget anyway (`opens_full`) takes vLLM's offer in
    its first step without a planner call; in its next step it is planned from its start, so
    its chunks are exactly those of the request planned at once (hand-made plans: 2048, then
    512s, so the first chunk is the offer)."""
    def run(opens_full):
        planner = CountingPlanner(512)
        calls = []

        def plan(mode, n, h):
            calls.append((n, h))
            return [2048] + planner(mode, n - 2048, h + 2048)

        s = new_sizer(plan, floor=128, align=64, opens_full=opens_full)
        got, h, first_step_calls = [], 0, None
        while h < 10_000:
            s.begin_step(2048)
            c = take(s, ask("r", 10_000, history=h, offered=2048))
            s.advance("r", h, c)
            s.end_step()
            first_step_calls = len(calls) if first_step_calls is None else first_step_calls
            got.append(c)
            h += c
        return got, calls, first_step_calls, s

    now, calls_now, first_now, _ = run(None)
    later, calls_later, first_later, s = run(lambda mode, n, h: n > 4096)
    assert later == now == [2048] + [512] * 15 + [10_000 - 2048 - 512 * 15]
    assert first_now == 1 and first_later == 0  # no planning in the admitting step
    assert calls_later == calls_now == [(10_000, 0)]  # one plan, from the request's start
    assert s.num_deferred == 1 and s.requests.plan_log["r"] == [(0, now)]


def test_a_put_off_request_shares_its_first_step_as_a_planned_one_would():
    """Sized after another prefill, a put-off request's offer counts as its planned chunk:
    the step's time and the closed-form fit are those of
    `test_a_later_prefill_fills_the_remaining_time_exactly`, not the offer taken whole."""
    planner = CountingPlanner(2048)
    s = new_sizer(planner, floor=64, align=64, opens_full=lambda m, n, h: True)
    s.begin_step(8192)
    assert take(s, ask("a", 2048 + 300, history=2048, offered=300)) == 300
    second = take(s, ask("b", 10_000, history=1024, offered=2048))
    target = MODEL.predict_time(2048, 1024)
    best = max(x for x in range(64, 2049, 64)
               if MODEL.predict_batch([(300, 2048), (x, 1024)]) <= target)
    assert second == best < 2048
    assert s.num_deferred == 2 and planner.calls == []


def test_the_budget_counts_only_what_vllm_committed():
    """`size` counts nothing: vLLM's lookahead retry (it asks with its own number after dcpp's
    cut fell in its window) commits that number instead; a request vLLM then preempts in the
    same step, or did not schedule (0), leaves the step's room and time again."""
    s, _ = sizer(floor=64)
    s.begin_step(1000)
    first = s.size(ask("a", 5000))
    assert s.size(ask("a", 5000)) == first  # asked twice, nothing counted yet
    s.commit("a", 0, 600)  # vLLM's retry took 600, not dcpp's number
    assert s._step.prefill_room == 400
    assert take(s, ask("b", 5000)) <= 400
    s.uncommit("b")  # preempted later in the same step
    s.commit("a", 0, 0)  # and "a" was not scheduled after all
    assert s._step.prefill_room == 1000 and s._step.batch_s(MODEL) == 0.0
    assert take(s, ask("c", 5000)) == first  # the whole step is its own again


def test_a_later_prefill_is_fitted_to_the_committed_chunks_only():
    """The step's time target comes from committed planned chunks: a plan whose request vLLM
    did not schedule sets no target for the ones after it."""
    s, _ = sizer(floor=64, chunk=2048)
    s.begin_step(8192)
    s.size(ask("slow", 100_000, history=50_000))  # a slow planned chunk, never committed
    s.commit("slow", 50_000, 0)
    assert take(s, ask("a", 2048 + 300, history=2048)) == 300
    second = take(s, ask("b", 10_000, history=1024))
    target = MODEL.predict_time(2048, 1024)  # "slow"'s chunk does not raise the target
    best = max(x for x in range(64, 2049, 64)
               if MODEL.predict_batch([(300, 2048), (x, 1024)]) <= target)
    assert second == best
