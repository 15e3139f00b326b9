"""`DcppRuntime` built from plain values (no engine, no adapter): its phases and their one
place of change, the one owner of the planning model, and the per-request records."""

from __future__ import annotations

import pytest

from dcpp.chunker.latency_model import HistoryLatencyModel
from dcpp.config import ProfilingChunkConfig
from dcpp.online.engine import EngineLimits, Offer, Scheduled, ScheduledStep, StartupProfile
from dcpp.online.runtime import DcppRuntime, Phase

MODEL = HistoryLatencyModel(alpha=2e-9, beta=4e-9, gamma=2e-6, delta=0.0, c=2e-3)
LIMITS = EngineLimits(max_num_batched_tokens=1024, max_model_len=16384, page_size=16,
                      num_stages=2)


def config(**kw):
    block = {"enabled": True, "min_chunk": 64, **kw}
    return ProfilingChunkConfig.from_additional_config(
        {"profiling_chunk_config": block}).check_engine(
        pipeline_parallel_size=2, enable_chunked_prefill=True, max_num_batched_tokens=1024)


def profile(model=None, source="none", unsupported=None, path=None):
    samples = [([(c, 0)], float(MODEL.predict_time(c, 0))) for c in (64, 256, 1024)]
    return StartupProfile(model=model, source=source, path=path, passes=0,
                          samples=samples if model is not None else [],
                          unsupported=unsupported, cache_key={"model": "m"})


@pytest.mark.parametrize("kw, prof, phase", [
    ({}, profile(), Phase.STATIC),
    ({"need_timing": False}, profile(MODEL, "cache"), Phase.PROFILED),
    ({}, profile(MODEL, "cache"), Phase.CALIBRATED),
    ({"live_calibration": True}, profile(), Phase.LIVE),
    ({}, profile(unsupported="the runner ignores a history"), Phase.LIVE),
    ({"need_timing": False}, profile(unsupported="the runner ignores a history"), Phase.STATIC),
])
def test_the_start_phase_follows_the_profile_and_config(kw, prof, phase):
    rt = DcppRuntime(config(**kw), LIMITS, prof)
    assert rt.phase is phase
    assert (rt.model is MODEL) is (phase in (Phase.PROFILED, Phase.CALIBRATED))
    assert (rt.cal is not None) is (phase is Phase.CALIBRATED)
    assert (rt.live is not None) is (phase is Phase.LIVE)


def test_only_the_listed_transitions_are_allowed():
    rt = DcppRuntime(config(), LIMITS, profile(MODEL, "cache"))
    with pytest.raises(AssertionError, match="calibrated -> live"):
        rt._enter(Phase.LIVE)
    static = DcppRuntime(config(need_timing=False), LIMITS, profile())
    static._enter(Phase.PROFILED, MODEL)
    assert static.phase is Phase.PROFILED and static.model is MODEL
    with pytest.raises(AssertionError, match="profiled -> calibrated"):
        static._enter(Phase.CALIBRATED, MODEL)


def test_the_live_fit_switches_to_calibrated_once(monkeypatch, tmp_path):
    """LIVE -> CALIBRATED through the live fit's first model: calibration starts from it, the
    fit is saved as the profile, the predictors plan with it (no copy to keep in step)."""
    rt = DcppRuntime(config(live_calibration=True), LIMITS,
                     profile(path=str(tmp_path / "p.json")))
    monkeypatch.setattr(rt.live, "observe", lambda batch, measured: MODEL)
    rt._measured([(512, 0)], 0.01, None)
    assert rt.phase is Phase.CALIBRATED and rt.live is None and rt.cal is not None
    assert rt.profile.source == "live" and (tmp_path / "p.json").exists()
    assert rt.predictors["pipeline"].model is rt.model  # asked of the one owner
    assert rt.sizer.model is rt.model


def test_the_planning_model_has_one_owner():
    rt = DcppRuntime(config(need_timing=False), LIMITS, profile(MODEL, "cache"))
    before = rt.predictors["pipeline"].plan(6000)
    slower = MODEL.scaled(3.0)
    version = rt.planning.version
    assert rt.planning.set(slower) and rt.planning.version == version + 1
    assert not rt.planning.set(slower)  # the same model: nothing changes
    for p in rt.predictors.values():
        assert p.model is slower
    assert rt.sizer.model is slower
    after = rt.predictors["pipeline"].plan(6000)
    assert sum(after) == sum(before) == 6000


def _step(fp, *reqs):
    return ScheduledStep(fp, tuple(Scheduled(*r) for r in reqs))


def test_each_request_is_one_record_freed_in_one_place():
    """Sizing, running and a bad option all write to the request's record; `free` drops it
    whole, while the logs keep what ran and what was planned."""
    rt = DcppRuntime(config(need_timing=False), LIMITS, profile(MODEL, "cache"))
    rt.begin_step(1024)
    c = rt.cap(Offer("a", total=6000, history=0, offered=1024, plan_arg="equal_time",
                     chunk_arg=0))  # a bad chunk size: ignored, with a warning
    rt.commit("a", 0, c)
    rt.end_step(_step(1, ("a", c, 0, 6000, "equal_time", 0)))
    state = rt.requests.get("a")
    assert state.chunks == [c] and state.plan is not None and state.warned
    assert rt.plan_log["a"] == state.plans and rt.chunk_log["a"] == [c]
    rt.free(["a"])
    assert rt.requests.get("a") is None and len(rt.requests) == 0
    assert rt.chunk_log["a"] == [c] and rt.plan_log["a"][0][0] == 0  # the logs outlive it
    rt.free(None)  # nothing left: no error


def test_a_whole_prefill_freed_before_its_last_output_is_still_measured():
    """vLLM frees a request that ends on its prefill's last output (max_tokens=1) inside
    update_from_output, before dcpp sees that output: the whole-prefill measurement (what the
    per-step cost learns from) travels with the step, not on the freed record."""
    rt = DcppRuntime(config(), LIMITS, profile(MODEL, "cache"))
    chunks, h, t = [], 0, 0.0
    while h < 4096:
        rt.begin_step(1024)
        c = rt.cap(Offer("a", total=4097, history=h, offered=min(1024, 4097 - h),
                         plan_arg="equal_time"))
        rt.commit("a", h, c)
        rt.end_step(_step(100 + h, ("a", c, h, 4097, "equal_time", None)))
        t += 0.05
        if h + c >= 4097:
            rt.free(["a"])  # freed before its last output reaches dcpp
        rt.on_output(100 + h, t)
        chunks.append(c)
        h += c
    assert len(chunks) >= 4 and len(rt.requests) == 0
    assert len(rt.cal.overhead.request_gaps) == 1  # measured all the same
