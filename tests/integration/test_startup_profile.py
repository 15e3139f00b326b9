"""Start-up profiling (`startup_profile.load_or_profile`) on a fake config and executor, no
engine: failures that mean "no usable profile" (a corrupt cache file or one for another key, a
rejected fit, a failed or timed-out RPC, a model runner that cannot time a prefill) fall back
with a warning; a bug in dcpp (in the loader, or in reading the workers' results) propagates
instead of being taken for one of them. The chunker's profile cache
(`dcpp.chunker.profiler.load_or_profile`) follows the same rule for cached files. Also the
worker side's warnings where vLLM's internals drift."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dcpp.integration.vllm import startup_profile, vllm_compat, vllm_compat_worker
from dcpp.tooling.fake_engine import BUDGET, FakeExecutor, dcpp_log, fake_vllm_config


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from dcpp.config import ProfilingChunkConfig

    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    for name in ("DCPP_PROFILE_REPEATS", "DCPP_PROFILE_TIMEOUT_S", "VLLM_ENGINE_READY_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    # What needs a live vLLM platform: fixed here.
    monkeypatch.setattr(vllm_compat, "platform_device_name", lambda: "fake-device")
    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: "0.32.0")
    vc = fake_vllm_config()
    cfg = ProfilingChunkConfig.from_additional_config(vc.additional_config).check_engine(
        pipeline_parallel_size=2, enable_chunked_prefill=True, max_num_batched_tokens=BUDGET)
    return vc, cfg


@pytest.fixture
def warnings_log(caplog):
    with dcpp_log(caplog):
        yield caplog


def load(setup, executor):
    vc, cfg = setup
    return startup_profile.load_or_profile(vc, cfg, executor)


def test_profiles_then_loads_from_the_cache(setup):
    ex = FakeExecutor()
    first = load(setup, ex)
    assert first.source == "profiled" and first.model is not None and first.passes == ex.calls
    again = load(setup, FakeExecutor())
    assert again.source == "cache" and again.passes == 0 and again.path == first.path


def test_an_engine_with_a_kv_connector_gets_a_profile_of_its_own(setup):
    """A KV connector changes the step times (a NIXL producer: 1.5-1.7x slower here), so its
    engine profiles again instead of loading the plain engine's profile; without a connector
    the key (and the cached file) stays what it was."""
    vc, cfg = setup
    plain = load(setup, FakeExecutor())
    assert "kv_connector" not in startup_profile.cache_key(vc, cfg)
    vc.kv_transfer_config = NS(kv_connector=None, kv_role=None)  # a config without one
    assert load(setup, FakeExecutor()).path == plain.path
    vc.kv_transfer_config = NS(kv_connector="NixlPushConnector", kv_role="kv_producer")
    assert startup_profile.cache_key(vc, cfg)["kv_connector"] == "NixlPushConnector/kv_producer"
    ex = FakeExecutor()
    with_connector = load(setup, ex)
    assert with_connector.source == "profiled" and ex.calls > 0
    assert with_connector.path != plain.path
    vc.kv_transfer_config = NS(kv_connector="NixlPushConnector", kv_role="kv_consumer")
    assert load(setup, FakeExecutor()).path not in (plain.path, with_connector.path)


def test_a_bug_in_the_profile_loader_propagates(setup, monkeypatch):
    from dcpp.chunker.profiler import Profile

    load(setup, FakeExecutor())  # a valid cached profile

    def broken(cls, path):
        raise TypeError("Profile.load() got an unexpected keyword argument")

    monkeypatch.setattr(Profile, "load", classmethod(broken))
    ex = FakeExecutor()
    with pytest.raises(TypeError, match="unexpected keyword"):
        load(setup, ex)
    assert ex.calls == 0  # not taken for a corrupt file: no "profiling again"


DAMAGES = ["{", '{"format": 1}', "\xff\xfe", "directory", "other key"]
"""Cached profiles that cannot be used: not JSON, not a dcpp profile, not UTF-8, not a file,
made for another cache key."""


def spoil(path, damage):
    import json
    import os

    if damage == "other key":
        doc = json.loads(open(path).read())
        doc["cache_key"]["model"] = "another-model"
        text = json.dumps(doc)
    os.remove(path)
    if damage == "directory":
        os.mkdir(path)  # exists, but reading it is an OSError (or not a file: ValueError)
        return
    with open(path, "w", encoding="latin-1") as f:
        f.write(text if damage == "other key" else damage)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupt_cache_file_is_profiled_again(setup, warnings_log, damage):
    path = load(setup, FakeExecutor()).path
    spoil(path, damage)
    ex = FakeExecutor()
    res = load(setup, ex)
    assert "profiling again" in warnings_log.text and path in warnings_log.text
    if damage != "directory":
        assert res.source == "profiled" and ex.calls > 0


def _chunker_cache(tmp_path):
    """`dcpp.chunker.profiler.load_or_profile` on a synthetic timer: (load, its key, calls)."""
    from dcpp.chunker import profiler
    from dcpp.tooling.fake_engine import MAX_LEN, true_time

    key = profiler.cache_key(model="fake-model", dtype="float32", pipeline_parallel_size=2,
                             tensor_parallel_size=1, device="fake-device",
                             max_num_batched_tokens=BUDGET, max_model_len=MAX_LEN)
    calls = []

    def timer(n, h):
        calls.append((n, h))
        return true_time(n, h)

    def load_chunker():
        return profiler.load_or_profile(timer, key, tmp_path, max_num_batched_tokens=BUDGET,
                                        max_model_len=MAX_LEN, num_samples=8)

    return load_chunker, profiler.cache_path(key, tmp_path), calls


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_chunker_profile_cache_follows_the_same_rule(tmp_path, caplog, damage):
    """`dcpp.chunker.profiler.load_or_profile` (the CLI's and the reference's cache) shares
    the rule (`profiler.load_cached`): each unusable file warns and is profiled again."""
    load_chunker, path, calls = _chunker_cache(tmp_path)
    load_chunker()
    spoil(str(path), damage)
    before = len(calls)
    with caplog.at_level(logging.WARNING, logger="dcpp.chunker.profiler"):
        if damage == "directory":
            with pytest.raises(OSError):  # profiled again, but nothing can be saved there
                load_chunker()
        else:
            again = load_chunker()
            assert again.cache_key["model"] == "fake-model"
    assert "profiling again" in caplog.text and str(path) in caplog.text
    assert len(calls) > before


def test_a_bug_in_the_profile_loader_propagates_from_the_chunker_cache(tmp_path, monkeypatch):
    from dcpp.chunker.profiler import Profile

    load_chunker, _, calls = _chunker_cache(tmp_path)
    load_chunker()

    def broken(cls, path):
        raise TypeError("Profile.load() got an unexpected keyword argument")

    monkeypatch.setattr(Profile, "load", classmethod(broken))
    before = len(calls)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_chunker()
    assert len(calls) == before


@pytest.mark.parametrize("executor, what", [
    (FakeExecutor(fn=lambda n, h: 0.01), "FitError"),  # timings independent of the chunk
    (FakeExecutor(error=RuntimeError("Worker failed with error 'CUDA out of memory'")),
     "RuntimeError"),
    (FakeExecutor(error=TimeoutError("RPC call to stage_timed_prefill timed out.")),
     "TimeoutError"),
])
def test_profiling_failures_fall_back_to_static_chunking(setup, warnings_log, executor, what):
    res = load(setup, executor)
    assert res.model is None and res.source == "none" and res.unsupported is None
    assert f"start-up profiling failed ({what}" in warnings_log.text
    assert "falling back to static chunking" in warnings_log.text


def test_a_fit_rejected_twice_counts_both_tries(setup):
    ex = FakeExecutor(fn=lambda n, h: 0.01)
    res = load(setup, ex)
    assert res.model is None and res.passes == ex.calls and ex.calls > 17


def test_profiling_past_its_budget_falls_back(setup, monkeypatch, warnings_log):
    monkeypatch.setenv("DCPP_PROFILE_TIMEOUT_S", "1e-9")
    res = load(setup, FakeExecutor())
    assert res.model is None and "TimeoutError" in warnings_log.text
    assert "DCPP_PROFILE_TIMEOUT_S" in warnings_log.text


def test_an_unsupported_model_runner_is_reported(setup, warnings_log):
    ex = FakeExecutor(reply=lambda n, h: [{"pp_rank": 0, "tp_rank": 0, "seconds": None,
                                           "unsupported": "V2 model runner"}])
    res = load(setup, ex)
    assert res.model is None and "V2 model runner" in res.unsupported
    assert "cannot run on this engine's model runner" in warnings_log.text


def test_a_bug_in_reading_the_workers_results_propagates(setup):
    ex = FakeExecutor(reply=lambda n, h: [{"pp_rank": 0, "tp_rank": 0}])  # no "seconds"
    with pytest.raises(KeyError, match="seconds"):
        load(setup, ex)


# --- worker side -----------------------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch, warnings_log):
    monkeypatch.setattr(vllm_compat_worker, "_warned", set())
    return warnings_log


def test_worker_stage_warns_once_when_the_rank_is_unreadable(monkeypatch, fresh_warnings):
    monkeypatch.setitem(sys.modules, "vllm.distributed", None)  # ImportError
    worker = NS(model_runner=None)
    assert vllm_compat_worker.worker_stage(worker) == {"pp_rank": -1, "tp_rank": -1}
    assert vllm_compat_worker.worker_stage(worker) == {"pp_rank": -1, "tp_rank": -1}
    records = [r for r in fresh_warnings.records if "pipeline/tensor-parallel rank" in r.message]
    assert len(records) == 1 and "ModuleNotFoundError" in records[0].message


def test_worker_stage_bug_is_not_taken_for_drift(monkeypatch):
    fake = NS(get_pp_group=lambda: 1 / 0, get_tp_group=lambda: None)
    monkeypatch.setitem(sys.modules, "vllm.distributed", fake)
    with pytest.raises(ZeroDivisionError):
        vllm_compat_worker.worker_stage(NS(model_runner=None))


def test_unreadable_dummy_run_shape_warns_once(fresh_warnings):
    runner = NS()  # a runner whose buffers are not where vLLM 0.32 keeps them
    assert vllm_compat_worker._dummy_run_shape(runner) is None
    assert vllm_compat_worker._dummy_run_shape(runner) is None
    records = [r for r in fresh_warnings.records if "dummy run's shape" in r.message]
    assert len(records) == 1 and "AttributeError" in records[0].message
    assert "WITHOUT checking" in records[0].message


def test_readable_dummy_run_shape(fresh_warnings):
    runner = NS(query_start_loc=NS(np=np.array([0, 512, 512], dtype=np.int32)),
                optimistic_seq_lens_cpu=np.array([1536, 0], dtype=np.int32))
    assert vllm_compat_worker._dummy_run_shape(runner) == (512, 1536)
    assert not fresh_warnings.records
