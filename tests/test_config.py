"""ProfilingChunkConfig: parsing, validation messages (key, value, fix), engine checks."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from dcpp.config import ProfilingChunkConfig as Cfg


def test_defaults_match_vllm_ascend():
    c = Cfg()
    assert (c.enabled, c.smooth_factor, c.min_chunk) == (False, 1.0, 4096)
    assert c.need_timing is False  # forced off while disabled
    assert Cfg(enabled=True).need_timing is True
    assert c.plan_mode == "pipeline"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.enabled = True  # type: ignore[misc]


@pytest.mark.parametrize("additional", [None, {}, {"other": 1}, {"scheduler_config": {}}])
def test_absent_block_gives_disabled_default(additional):
    assert Cfg.from_additional_config(additional) == Cfg()


def test_block_top_level_and_nested():
    block = {"enabled": True, "smooth_factor": 0.5, "min_chunk": 1024, "plan_mode": "equal_time"}
    top = Cfg.from_additional_config({"profiling_chunk_config": block})
    nested = Cfg.from_additional_config({"scheduler_config": {"profiling_chunk_config": block}})
    assert top == nested
    assert (top.enabled, top.smooth_factor, top.min_chunk, top.plan_mode) == (
        True, 0.5, 1024, "equal_time")
    both = {"profiling_chunk_config": block, "scheduler_config": {"profiling_chunk_config": block}}
    assert Cfg.from_additional_config(both) == top


# --- vllm-ascend configs (its ascend_config.py: SchedulerConfig, ProfilingChunkConfig) --------
def _nested(block):
    return {"scheduler_config": {"profiling_chunk_config": block}}


@pytest.mark.parametrize("block", [
    {"enabled": True},
    {"enabled": True, "smooth_factor": 1.0, "min_chunk": 4096},  # its tutorial's block
    {"enabled": True, "smooth_factor": 0.9},  # its e2e test's block
    {"enabled": True, "need_timing": False},
    {"enabled": True, "smooth_factor": 0.0},  # documented: "no dynamic adjustment"
    {"enabled": True, "smooth_factor": 1},  # an int where a float is documented
    {"enabled": True, "smooth_factor": 0.75, "min_chunk": 2048, "need_timing": True,
     "max_fit_chunk": 30},  # every documented key
    {"enabled": False, "max_fit_chunk": 6},  # the smallest max_fit_chunk it accepts
])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_every_vllm_ascend_block_is_accepted(block, where):
    additional = {"profiling_chunk_config": block} if where == "top" else _nested(block)
    c = Cfg.from_additional_config(additional)
    own = {k: v for k, v in block.items() if k != "max_fit_chunk"}
    assert c == Cfg(**own)
    assert c.enabled is block["enabled"]
    assert c.smooth_factor == block.get("smooth_factor", 1.0)
    assert c.min_chunk == block.get("min_chunk", 4096)
    assert c.need_timing is (block.get("need_timing", True) and block["enabled"])


def test_max_fit_chunk_is_ignored_with_a_log_line_saying_what_dcpp_does(caplog):
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        c = Cfg.from_dict({"enabled": True, "max_fit_chunk": 40})
    assert c == Cfg(enabled=True)
    assert not hasattr(c, "max_fit_chunk")
    lines = [r.getMessage() for r in caplog.records if "max_fit_chunk" in r.getMessage()]
    assert len(lines) == 1
    assert "max_fit_chunk=40" in lines[0] and "no effect" in lines[0]
    assert "calibration_window" in lines[0] and "need_timing=false" in lines[0]
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        caplog.clear()
        Cfg.from_dict({"enabled": True})
    assert "max_fit_chunk" not in caplog.text  # no line when the key is absent


@pytest.mark.parametrize("value", ["30", 30.0, True, None, [30]])
def test_max_fit_chunk_wrong_type_names_key_value_and_fix(value):
    with pytest.raises(ValueError) as e:
        Cfg.from_dict({"enabled": True, "max_fit_chunk": value})
    msg = str(e.value)
    assert f"max_fit_chunk={value!r}" in msg and "wrong type" in msg
    assert "fix: set max_fit_chunk to an int >= 6" in msg and "remove it" in msg


@pytest.mark.parametrize("value", [5, 0, -30])
def test_max_fit_chunk_below_vllm_ascend_range_is_rejected(value):
    # vllm-ascend raises for max_fit_chunk <= 5; dcpp names the same rule and the fix.
    with pytest.raises(ValueError, match=f"max_fit_chunk={value} is out of range; fix: set "
                                         "max_fit_chunk to an int >= 6"):
        Cfg.from_dict({"max_fit_chunk": value})


def test_nested_block_wins_over_top_level_with_a_warning_naming_both(caplog):
    d = {"profiling_chunk_config": {"enabled": True, "min_chunk": 512},
         "scheduler_config": {"profiling_chunk_config": {"enabled": True, "min_chunk": 2048}}}
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        c = Cfg.from_additional_config(d)
    assert c.min_chunk == 2048  # the nested value, not the top level's 512
    text = caplog.text
    assert "additional_config.profiling_chunk_config (top level) is ignored" in text
    assert "additional_config.scheduler_config.profiling_chunk_config" in text
    assert "values differ" in text and "deprecates" in text
    assert "fix: remove the top-level" in text


def test_nested_block_wins_whole_and_the_ignored_top_level_is_not_checked(caplog):
    # No key-by-key merge (vllm-ascend takes the nested dict as it is), and the ignored block
    # may hold anything, as vllm-ascend never reads it either.
    d = {"profiling_chunk_config": {"enabled": True, "smooth_factor": 0.5, "bogus": "x"},
         "scheduler_config": {"profiling_chunk_config": {"enabled": False}}}
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        c = Cfg.from_additional_config(d)
    assert c == Cfg()
    assert "is ignored" in caplog.text


def test_equal_blocks_at_both_levels_warn_without_claiming_a_difference(caplog):
    block = {"enabled": True, "min_chunk": 1024}
    d = {"profiling_chunk_config": block, **_nested(dict(block))}
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        assert Cfg.from_additional_config(d) == Cfg(enabled=True, min_chunk=1024)
    assert "is ignored" in caplog.text and "values differ" not in caplog.text


def test_nested_null_block_counts_as_given():
    d = {"profiling_chunk_config": {"enabled": True}, **_nested(None)}
    assert Cfg.from_additional_config(d) == Cfg()


def test_top_level_alone_is_dcpps_own_form_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        Cfg.from_additional_config({"profiling_chunk_config": {"enabled": True}})
        Cfg.from_additional_config({"scheduler_config": {"other": 1}})
    assert caplog.text == ""


def test_unknown_key_lists_vllm_ascend_keys_and_suggests_max_fit_chunk():
    with pytest.raises(ValueError) as e:
        Cfg.from_additional_config(_nested({"enabled": True, "max_fit_chunks": 30}))
    msg = str(e.value)
    assert "unknown key 'max_fit_chunks'" in msg and "did you mean 'max_fit_chunk'" in msg
    assert "valid keys: enabled" in msg and "max_fit_chunk" in msg.split("valid keys:")[1]


def test_unknown_key_suggests_closest_and_lists_valid():
    with pytest.raises(ValueError) as e:
        Cfg.from_additional_config({"profiling_chunk_config": {"smoth_factor": 0.5}})
    msg = str(e.value)
    assert "'smoth_factor'" in msg and "did you mean 'smooth_factor'" in msg
    for key in ("enabled", "min_chunk", "need_timing", "plan_mode"):
        assert key in msg


def test_unknown_key_without_close_match_lists_valid():
    with pytest.raises(ValueError, match="unknown key 'zzz'.*valid keys: enabled") as e:
        Cfg.from_dict({"zzz": 1})
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("enabled", "yes"), ("enabled", 1), ("need_timing", "true"), ("smooth_factor", "0.8"),
    ("smooth_factor", True), ("min_chunk", 4096.0), ("min_chunk", "4096"), ("min_chunk", True),
    ("plan_mode", 3), ("profile_cache_dir", 5), ("num_profile_samples", 16.5),
    ("drift_threshold", "0.1"), ("calibration_window", None), ("live_calibration", "true"),
    ("live_calibration", 1),
])
def test_wrong_type_names_key_value_and_fix(key, value):
    with pytest.raises(ValueError) as e:
        Cfg.from_dict({key: value})
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and "wrong type" in msg and f"fix: set {key} to" in msg


@pytest.mark.parametrize("key,value", [
    ("smooth_factor", 1.5), ("smooth_factor", -0.1), ("smooth_factor", float("nan")),
    ("min_chunk", 0), ("min_chunk", -64), ("plan_mode", "fast"), ("num_profile_samples", 2),
    ("calibration_window", 1), ("drift_threshold", 0.0), ("profile_cache_dir", ""),
])
def test_out_of_range_names_key_value_and_fix(key, value):
    with pytest.raises(ValueError) as e:
        Cfg.from_dict({key: value})
    msg = str(e.value)
    assert key in msg and "fix: set" in msg
    assert ("out of range" in msg) or ("wrong type" in msg)  # nan is not a finite number


def test_string_value_hint_mentions_quotes():
    with pytest.raises(ValueError, match="without quotes"):
        Cfg.from_dict({"smooth_factor": "0.8"})


def test_block_and_additional_config_must_be_dicts():
    with pytest.raises(ValueError, match="profiling_chunk_config must be a dict"):
        Cfg.from_additional_config({"profiling_chunk_config": [1]})
    with pytest.raises(ValueError, match="additional_config must be a dict"):
        Cfg.from_additional_config("enabled")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduler_config'\\] must be a dict"):
        Cfg.from_additional_config({"scheduler_config": 3})


def test_need_timing_forced_off_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        c = Cfg.from_dict({"enabled": False, "need_timing": True})
    assert c.need_timing is False
    assert "need_timing" in caplog.text


def test_live_calibration_needs_timing():
    """Live calibration fits on step timings: with need_timing off it cannot, and says so."""
    assert Cfg().live_calibration is False
    assert Cfg.from_dict({"enabled": True, "live_calibration": True}).live_calibration is True
    with pytest.raises(ValueError) as e:
        Cfg.from_dict({"enabled": True, "need_timing": False, "live_calibration": True})
    msg = str(e.value)
    assert "live_calibration=True needs step timings" in msg and "need_timing=False" in msg
    assert "fix: set need_timing to true" in msg
    # Disabled, nothing runs: not an error (need_timing is forced off anyway).
    assert not Cfg.from_dict({"enabled": False, "live_calibration": True}).need_timing


ENGINE = dict(pipeline_parallel_size=2, enable_chunked_prefill=True, max_num_batched_tokens=8192)


def test_check_engine_requires_pp_and_chunked_prefill():
    c = Cfg(enabled=True)
    with pytest.raises(ValueError, match="pipeline_parallel_size=1.*fix"):
        c.check_engine(**{**ENGINE, "pipeline_parallel_size": 1})
    with pytest.raises(ValueError, match="enable_chunked_prefill=False.*fix"):
        c.check_engine(**{**ENGINE, "enable_chunked_prefill": False})
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        c.check_engine(**{**ENGINE, "max_num_batched_tokens": 0})
    assert c.check_engine(**ENGINE) == c
    # Disabled: dcpp does nothing, so nothing is required.
    assert Cfg().check_engine(**{**ENGINE, "pipeline_parallel_size": 1}) == Cfg()


def test_check_engine_clamps_min_chunk_with_warning(caplog):
    c = Cfg(enabled=True, min_chunk=4096)
    with caplog.at_level(logging.WARNING, logger="dcpp.config"):
        out = c.check_engine(**{**ENGINE, "max_num_batched_tokens": 2048})
    assert out.min_chunk == 2048 and c.min_chunk == 4096
    assert "min_chunk=4096" in caplog.text and "clamping" in caplog.text


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("DCPP_CACHE_DIR", raising=False)
    assert Cfg().resolved_cache_dir() == Path("~/.cache/dcpp/profiles").expanduser()
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    assert Cfg().resolved_cache_dir() == tmp_path
    assert Cfg(profile_cache_dir="/x/y").resolved_cache_dir() == Path("/x/y")


def test_engine_agnostic_imports():
    import subprocess
    import sys

    code = ("import sys, dcpp.config, dcpp.chunker, dcpp.cli; "
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name, raw, rule", [
    ("DCPP_PROFILE_TIMEOUT_S", "soon", "a number in (0, inf]"),
    ("DCPP_PROFILE_TIMEOUT_S", "-5", "a number in (0, inf]"),
    ("DCPP_PROFILE_REPEATS", "0", "an integer in [1, 64]"),
    ("DCPP_PROFILE_REPEATS", "2.5", "an integer in [1, 64]"),
    ("VLLM_ENGINE_READY_TIMEOUT_S", "nan", "a number in (0, inf]"),
])
def test_bad_environment_variables_name_the_variable_and_range(monkeypatch, name, raw, rule):
    from dcpp import envs

    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError) as e:
        envs.profile_timeout_s() if "REPEATS" not in name else envs.profile_repeats()
    assert name in str(e.value) and repr(raw) in str(e.value) and rule in str(e.value)


def test_environment_defaults(monkeypatch):
    from dcpp import envs

    for name in ("DCPP_PROFILE_TIMEOUT_S", "DCPP_PROFILE_REPEATS", "VLLM_ENGINE_READY_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    assert envs.profile_timeout_s() == 200.0 and envs.profile_repeats() == 2
    monkeypatch.setenv("VLLM_ENGINE_READY_TIMEOUT_S", "60")
    assert envs.profile_timeout_s() == 30.0
