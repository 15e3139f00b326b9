"""The plugin's start-up checks on vLLM's real config path (no engine is started).

`EngineArgs.create_engine_config()` runs the same `VllmConfig` construction and platform hook as
`LLM(...)` and `vllm serve`, in the calling process, before anything is spawned.
"""

from __future__ import annotations

import pytest

from vllm_testlib import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

SCHED = "dcpp.integration.vllm.scheduler.DcppScheduler"
EXT = "dcpp.integration.vllm.worker_extension.DcppWorkerExtension"


def engine_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model), skip_tokenizer_init=True, pipeline_parallel_size=2,
                enable_chunked_prefill=True, max_num_batched_tokens=512, max_model_len=4096,
                dtype="float32")
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_plugin_is_registered():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("dcpp") == "dcpp.integration.vllm.plugin:register"


@pytest.mark.parametrize("additional", [None, {}, {"profiling_chunk_config": {"enabled": False}},
                                        {"other_plugin": {"x": 1}}])
def test_absent_or_disabled_block_leaves_vllm_alone(tiny_checkpoint, additional):
    kw = {} if additional is None else {"additional_config": additional}
    cfg = engine_config(tiny_checkpoint, **kw)
    plain = engine_config(tiny_checkpoint)
    assert cfg.scheduler_config.scheduler_cls == plain.scheduler_config.scheduler_cls
    assert cfg.parallel_config.worker_extension_cls == plain.parallel_config.worker_extension_cls
    assert cfg.scheduler_config.scheduler_cls != SCHED


@pytest.mark.parametrize("additional", [
    {"profiling_chunk_config": {"enabled": True}},
    {"scheduler_config": {"profiling_chunk_config": {"enabled": True}}},
])
def test_enabled_block_switches_scheduler_and_worker_extension(tiny_checkpoint, additional):
    cfg = engine_config(tiny_checkpoint, additional_config=additional)
    assert cfg.scheduler_config.scheduler_cls == SCHED
    assert cfg.parallel_config.worker_extension_cls == EXT


def test_user_named_dcpp_scheduler_is_kept(tiny_checkpoint):
    cfg = engine_config(tiny_checkpoint, scheduler_cls=SCHED,
                        additional_config={"profiling_chunk_config": {"enabled": True}})
    assert cfg.scheduler_config.scheduler_cls == SCHED


def test_user_named_other_scheduler_fails_fast(tiny_checkpoint):
    with pytest.raises(ValueError, match="--scheduler-cls"):
        engine_config(tiny_checkpoint, scheduler_cls="mypkg.MyScheduler",
                      additional_config={"profiling_chunk_config": {"enabled": True}})


@pytest.mark.parametrize("block, match", [
    ({"enabled": True, "smooth_factr": 0.5}, "smooth_factor"),
    ({"enabled": True, "min_chunk": -1}, "min_chunk"),
    ({"enabled": True, "plan_mode": "fastest"}, "plan_mode"),
    ("yes", "profiling_chunk_config"),
])
def test_bad_config_fails_at_startup_with_message(tiny_checkpoint, block, match):
    with pytest.raises(ValueError, match=match):
        engine_config(tiny_checkpoint, additional_config={"profiling_chunk_config": block})


@pytest.mark.parametrize("name, value", [("DCPP_PROFILE_REPEATS", "0"),
                                         ("DCPP_BUBBLE_SAMPLE_EVERY", "often"),
                                         ("DCPP_METRICS_HOST", "my host")])
def test_bad_environment_variable_fails_at_startup_naming_it(tiny_checkpoint, monkeypatch,
                                                             name, value):
    """Checked in the config hook (the process that builds the config, before EngineCore is
    spawned and weights load), not in the scheduler's __init__ later."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r} must be"):
        engine_config(tiny_checkpoint,
                      additional_config={"profiling_chunk_config": {"enabled": True}})
    engine_config(tiny_checkpoint)  # dcpp off: the variable is not read


def test_pp1_fails_fast(tiny_checkpoint):
    with pytest.raises(ValueError, match="pipeline-parallel-size"):
        engine_config(tiny_checkpoint, pipeline_parallel_size=1,
                      additional_config={"profiling_chunk_config": {"enabled": True}})


def test_chunked_prefill_off_fails_fast(tiny_checkpoint):
    with pytest.raises(ValueError, match="chunked"):
        engine_config(tiny_checkpoint, enable_chunked_prefill=False, max_num_batched_tokens=4096,
                      additional_config={"profiling_chunk_config": {"enabled": True}})


def test_eager_with_pp_on_cpu_is_rejected_with_fix(tiny_checkpoint):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the eager+PP crash is specific to vLLM's CPU backend")
    with pytest.raises(ValueError, match="enforce_eager"):
        engine_config(tiny_checkpoint, enforce_eager=True,
                      additional_config={"profiling_chunk_config": {"enabled": True}})


def test_llm_constructor_fails_fast_on_pp1(tiny_checkpoint):
    """The user-facing `LLM(...)` raises the message before spawning anything."""
    import time

    from vllm import LLM

    import vllm_testlib as lib

    before = {p.pid for p in lib.descendants()}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="pipeline parallelism"):
        LLM(model=str(tiny_checkpoint), skip_tokenizer_init=True, pipeline_parallel_size=1,
            additional_config={"profiling_chunk_config": {"enabled": True}})
    assert time.monotonic() - t0 < 30
    assert {p.pid for p in lib.descendants()} <= before


def test_async_scheduling_gets_the_async_scheduler(tiny_checkpoint):
    """vLLM 0.32 forces async scheduling off for PP on CPU (the config above); where it stays on
    (GPU executors), dcpp must install its async variant, which keeps vLLM's AsyncScheduler and
    the per-request hook."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from dcpp.integration.vllm import ASYNC_SCHEDULER_CLS, vllm_compat
    from dcpp.integration.vllm.plugin import configure_engine
    from dcpp.integration.vllm.scheduler import DcppAsyncScheduler

    cfg = engine_config(tiny_checkpoint, max_num_batched_tokens=2048,
                        additional_config={"profiling_chunk_config": {"enabled": True}})
    assert cfg.scheduler_config.async_scheduling is False  # CPU + PP: vLLM's own decision
    cfg.scheduler_config.async_scheduling = True  # as on a GPU executor that supports it
    cfg.scheduler_config.scheduler_cls = None
    configure_engine(cfg, None)
    assert cfg.scheduler_config.scheduler_cls == ASYNC_SCHEDULER_CLS
    assert issubclass(DcppAsyncScheduler, AsyncScheduler)
    vllm_compat.check_scheduler_hook(DcppAsyncScheduler)  # raises if the hook is missing


# --- vllm-ascend configs ---------------------------------------------------------------------
ASCEND_SCHED = "vllm_ascend.core.scheduler_profiling_chunk.ProfilingChunkScheduler"
"""vllm-ascend's scheduler class, which its platform hook installs when its block is enabled."""

REJECTED_BY_DCPP = {"enabled": True, "smooth_factor": "0.8", "min_chunk": 4096.0,
                    "not_a_key": 1}
"""A block dcpp rejects on three counts (vllm-ascend's own parser coerces the first two)."""


def _capture_plugin_log(caplog):
    import logging

    log = logging.getLogger("vllm.dcpp")  # vLLM may stop "vllm" propagating to root
    log.addHandler(caplog.handler)
    log.setLevel(logging.INFO)
    return log


def test_vllm_ascend_block_with_max_fit_chunk_turns_dcpp_on(tiny_checkpoint, caplog):
    block = {"enabled": True, "smooth_factor": 0.9, "min_chunk": 256, "need_timing": True,
             "max_fit_chunk": 30}
    with caplog.at_level("WARNING", logger="dcpp.config"):
        cfg = engine_config(tiny_checkpoint, additional_config={
            "scheduler_config": {"profiling_chunk_config": block}})
    assert cfg.scheduler_config.scheduler_cls == SCHED
    assert cfg.parallel_config.worker_extension_cls == EXT
    assert "max_fit_chunk=30" in caplog.text and "calibration_window" in caplog.text


@pytest.mark.parametrize("top, nested, dcpp_on", [
    ({"enabled": False}, {"enabled": True}, True),
    ({"enabled": True}, {"enabled": False}, False),
    ({"enabled": True, "smooth_factr": 2}, {"enabled": True}, True),  # ignored, unchecked
])
def test_nested_block_decides_over_top_level(tiny_checkpoint, caplog, top, nested, dcpp_on):
    additional = {"profiling_chunk_config": top,
                  "scheduler_config": {"profiling_chunk_config": nested}}
    with caplog.at_level("WARNING", logger="dcpp.config"):
        cfg = engine_config(tiny_checkpoint, additional_config=additional)
    assert (cfg.scheduler_config.scheduler_cls == SCHED) is dcpp_on
    assert "(top level) is ignored" in caplog.text
    assert "additional_config.scheduler_config.profiling_chunk_config" in caplog.text


def test_user_named_vllm_ascend_scheduler_keeps_control_unchecked(tiny_checkpoint, caplog):
    log = _capture_plugin_log(caplog)
    try:
        cfg = engine_config(tiny_checkpoint, scheduler_cls=ASCEND_SCHED,
                            additional_config={"profiling_chunk_config": REJECTED_BY_DCPP})
    finally:
        log.removeHandler(caplog.handler)
    assert cfg.scheduler_config.scheduler_cls == ASCEND_SCHED
    assert cfg.parallel_config.worker_extension_cls != EXT
    assert "dcpp: stays off" in caplog.text and "--scheduler-cls names vllm-ascend's" in caplog.text
    assert f"pass --scheduler-cls {SCHED}" in caplog.text


def test_scheduler_chosen_by_vllm_ascend_platform_keeps_control_unchecked(tiny_checkpoint,
                                                                          caplog):
    """vllm-ascend's platform hook runs before dcpp's and installs its scheduler when its block
    is enabled; here the hook's result is set by hand on a real VllmConfig."""
    from dcpp.integration.vllm.plugin import configure_engine

    cfg = engine_config(tiny_checkpoint)
    cfg.additional_config = {"scheduler_config": {"profiling_chunk_config": REJECTED_BY_DCPP}}
    cfg.scheduler_config.scheduler_cls = ASCEND_SCHED
    before_ext = cfg.parallel_config.worker_extension_cls
    log = _capture_plugin_log(caplog)
    try:
        configure_engine(cfg, None)  # would raise ValueError if dcpp read the block
    finally:
        log.removeHandler(caplog.handler)
    assert cfg.scheduler_config.scheduler_cls == ASCEND_SCHED
    assert cfg.parallel_config.worker_extension_cls == before_ext
    assert "vllm-ascend's platform selected its scheduler" in caplog.text
    # The same block with no vllm-ascend around is dcpp's, and rejected with the key named.
    cfg.scheduler_config.scheduler_cls = None
    with pytest.raises(ValueError, match="not_a_key"):
        configure_engine(cfg, None)


@pytest.fixture
def on_vllm_ascend_platform(monkeypatch):
    from dcpp.integration.vllm import plugin

    monkeypatch.setattr(plugin, "_platform_module", lambda: "vllm_ascend.platform")


@pytest.mark.parametrize("block", [REJECTED_BY_DCPP, {"enabled": False, "min_chunk": "1"},
                                   {"enabled": True}])
def test_on_vllm_ascend_platform_dcpp_stays_off_unless_named(tiny_checkpoint, caplog,
                                                             on_vllm_ascend_platform, block):
    log = _capture_plugin_log(caplog)
    try:
        cfg = engine_config(tiny_checkpoint, additional_config={"profiling_chunk_config": block})
    finally:
        log.removeHandler(caplog.handler)
    assert cfg.scheduler_config.scheduler_cls != SCHED
    assert cfg.parallel_config.worker_extension_cls != EXT
    assert "the platform is vllm-ascend's (vllm_ascend.platform)" in caplog.text


def test_on_vllm_ascend_platform_naming_dcpp_runs_and_checks_dcpp(tiny_checkpoint,
                                                                  on_vllm_ascend_platform):
    cfg = engine_config(tiny_checkpoint, scheduler_cls=SCHED,
                        additional_config={"profiling_chunk_config": {"enabled": True,
                                                                      "max_fit_chunk": 30}})
    assert cfg.scheduler_config.scheduler_cls == SCHED
    assert cfg.parallel_config.worker_extension_cls == EXT
    with pytest.raises(ValueError, match="not_a_key"):
        engine_config(tiny_checkpoint, scheduler_cls=SCHED,
                      additional_config={"profiling_chunk_config": REJECTED_BY_DCPP})
