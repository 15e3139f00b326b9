"""The runtime's small parts on their own (no vLLM): PrefillLog, StepLedger.returned,
RequestOptions, CalibrationSaver."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace as NS

from dcpp.online.calibration.saver import CalibrationSaver
from dcpp.online.prefill_log import PrefillLog
from dcpp.online.request_options import fixed_chunk, plan_mode
from dcpp.online.requests import RequestTable
from dcpp.online.step_ledger import LedgerEntry, StepLedger
from dcpp.online.calibration.step_overhead import StepOverhead


def test_only_planned_prefills_that_ran_alone_in_four_chunks_are_measured():
    log = PrefillLog(RequestTable())
    for rid, measured in (("alone", True), ("shared", True), ("static", False), ("short", True)):
        log.start(rid, 10.0, history=64, measured=measured)
    log.start("alone", 99.0, history=0, measured=False)  # already timed: no restart
    for _ in range(4):
        for rid in ("alone", "shared", "static"):
            log.ran(rid, 512)
    log.ran("short", 512)
    log.shared(["shared", "not-timed"])
    closed = log.close(["alone", "shared", "static", "short", "unknown"])
    log.requests.free(None)  # the engine may free them before their last output comes back
    done = log.measure(closed, t_out=12.5)
    assert [(d.chunks, d.history, d.elapsed_s) for d in done] == [([512] * 4, 64, 2.5)]
    assert log.timed() == [] and log.requests.chunk_log["shared"] == [512] * 4  # logs stay


def test_prefills_begun_before_timing_started_are_never_measured():
    log = PrefillLog(RequestTable())
    for _ in range(5):
        log.ran("early", 256)
    log.start_unmeasured(now=1.0)
    assert log.is_timed("early") and log.measure(log.close(["early"]), t_out=2.0) == []


def _entry(fp, at, prefill=True):
    return LedgerEntry(fp, at, [(256, 0)], prefill, [], NS())


def test_only_a_prefill_step_that_queued_behind_another_measures_an_interval():
    ledger = StepLedger()
    for fp, at in ((1, 0.0), (2, 0.1), (3, 0.2)):
        ledger.push(_entry(fp, at))
    ledger.push(_entry(4, 0.3, prefill=False))
    entry, interval = ledger.returned(1, t_out=0.5)  # the first output: the pipeline filled
    assert entry.fingerprint == 1 and interval is None
    entry, interval = ledger.returned(2, t_out=0.8)
    assert entry.fingerprint == 2 and abs(interval - 0.3) < 1e-12
    entry, interval = ledger.returned(4, t_out=1.0)  # 3 never came back; 4 is a decode
    assert entry.fingerprint == 4 and interval is None and len(ledger) == 0


def test_a_step_scheduled_after_the_last_output_measures_no_interval():
    ledger = StepLedger()
    ledger.push(_entry(1, 0.0))
    ledger.returned(1, t_out=0.5)
    ledger.push(_entry(2, 0.6))  # the pipeline was empty when it was scheduled
    entry, interval = ledger.returned(2, t_out=0.9)
    assert entry.fingerprint == 2 and interval is None
    assert ledger.returned(99, t_out=1.0) == (None, None)


def test_bad_request_options_fall_back_with_one_warning_each(caplog):
    table = RequestTable()
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        for _ in range(3):
            assert plan_mode(table.record("a"), "fastest", "pipeline") == "pipeline"
            assert fixed_chunk(table.record("a"), 0) is None
    assert caplog.text.count("unknown dcpp_plan 'fastest'") == 1
    assert caplog.text.count("dcpp_chunk_size=0 on request a") == 1
    assert plan_mode(table.record("b"), "off", "pipeline") == "off"
    assert fixed_chunk(table.record("b"), 1024) == 1024
    c = table.record("c")
    assert plan_mode(c, None, "pipeline") == "pipeline" and fixed_chunk(c, None) is None
    table.free(["a"])  # the warnings were the request's: a new request "a" is warned again
    with caplog.at_level(logging.WARNING, logger="vllm.dcpp"):
        plan_mode(table.record("a"), "fastest", "pipeline")
    assert caplog.text.count("unknown dcpp_plan 'fastest'") == 2


def test_vllm_request_options_are_read_from_extra_args():
    from dcpp.integration.vllm import vllm_compat

    r = NS(request_id="a", sampling_params=NS(extra_args={"dcpp_plan": "off",
                                                          "dcpp_chunk_size": 7}))
    assert vllm_compat.request_options(r) == ("off", 7)
    assert vllm_compat.request_options(NS(sampling_params=None)) == (None, None)
    assert vllm_compat.request_options(NS(sampling_params=NS(extra_args=None))) == (None, None)


class _Cal:
    profile_samples = [([(256, 0)], 1e-3)]

    def __init__(self):
        self.samples, self.overhead = [([(256, 0)], 1e-3)], StepOverhead(num_stages=2)


def test_the_saver_writes_on_idle_once_something_is_learnt_and_reads_it_back(tmp_path):
    profile = str(tmp_path / "p.json")
    cal = _Cal()
    saver = CalibrationSaver({"model": "m"})
    assert saver.bind(profile, cal, fresh=False) is None
    assert saver.path.endswith("p.calibration.json")
    saver.idle(cal)
    assert not os.path.exists(saver.path)  # nothing learnt yet
    saver.learnt(cal, refitted=False)
    saver.idle(cal)
    assert os.path.exists(saver.path)
    state = CalibrationSaver({"model": "m"}).bind(profile, cal, fresh=False)
    assert state.step_samples == [([(256, 0)], 1e-3)] and state.request_gaps == []
    assert CalibrationSaver({"model": "other"}).bind(profile, cal, fresh=False) is None
    # re-profiled: the old file goes
    assert CalibrationSaver({"model": "m"}).bind(profile, cal, fresh=True) is None
    assert not os.path.exists(saver.path)
    assert CalibrationSaver({"model": "m"}).bind(None, cal, fresh=False) is None  # no file


def test_steady_intervals_give_the_overhead_until_three_whole_prefills_do():
    from dcpp.chunker.latency_model import HistoryLatencyModel

    over = StepOverhead(num_stages=2)
    over.observe_step(10e-3, None)
    over.observe_step(10.5e-3, 12.5e-3)  # steady: 2 ms over compute
    over.observe_step(20e-3, 30e-3)  # grew by 90%: not steady, not counted
    assert abs(over.seconds() - 2e-3) < 1e-12
    model = HistoryLatencyModel(alpha=0.0, beta=0.0, gamma=1e-5, delta=0.0, c=0.0)
    for _ in range(2):  # 4 chunks of 100 tokens, P=2: model TTFT (4+1) * 1 ms = 5 ms
        over.observe_request(model, [100] * 4, 0, elapsed=10e-3)
    assert abs(over.seconds() - 2e-3) < 1e-12  # two prefills do not decide yet
    over.observe_request(model, [100] * 4, 0, elapsed=10e-3)
    assert abs(over.seconds() - 1e-3) < 1e-12  # (10 - 5) ms over 5 steps
