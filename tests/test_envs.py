"""dcpp's environment variables: parsed and checked in `dcpp.envs` only, every bad value a
ValueError naming the variable, the value and the fix; `check_all` at the plugin's config hook
(before weights load). No vLLM needed here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dcpp import envs
from dcpp.tooling.fake_engine import fake_vllm_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (*envs.VARIABLES, "VLLM_ENGINE_READY_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


def _bad_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    return f


BAD = [
    ("DCPP_CACHE_DIR", lambda tmp: str(_bad_file(tmp)), "it is a file"),
    ("DCPP_CACHE_DIR", lambda tmp: str(_bad_file(tmp) / "sub" / "dir"), "is a file"),
    ("DCPP_PROFILE_TIMEOUT_S", lambda tmp: "soon", "a number in (0, inf]"),
    ("DCPP_PROFILE_TIMEOUT_S", lambda tmp: "0", "a number in (0, inf]"),
    ("DCPP_PROFILE_REPEATS", lambda tmp: "0", "an integer in [1, 64]"),
    ("DCPP_PROFILE_REPEATS", lambda tmp: "three", "an integer in [1, 64]"),
    ("DCPP_BUBBLE_SAMPLE_EVERY", lambda tmp: "-1", "an integer in [0, 1073741824]"),
    ("DCPP_BUBBLE_SAMPLE_EVERY", lambda tmp: "0.5", "an integer in [0, 1073741824]"),
    ("DCPP_METRICS_HOST", lambda tmp: "my host", "without spaces"),
    ("DCPP_METRICS_HOST", lambda tmp: " 127.0.0.1", "without spaces"),
    ("DCPP_NIXL_PROGRESS_THREAD", lambda tmp: "off", "0 (no NIXL progress thread) or 1"),
    ("DCPP_NIXL_PROGRESS_THREAD", lambda tmp: "2", "0 (no NIXL progress thread) or 1"),
    ("VLLM_ENGINE_READY_TIMEOUT_S", lambda tmp: "nan", "a number in (0, inf]"),
]


@pytest.mark.parametrize("name, raw, rule", BAD)
def test_every_bad_variable_fails_check_all_naming_it(monkeypatch, tmp_path, name, raw, rule):
    value = raw(tmp_path)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as e:
        envs.check_all()
    msg = str(e.value)
    assert name in msg and repr(value) in msg and rule in msg
    assert f"fix: set {name}" in msg and "\n" not in msg


@pytest.mark.parametrize("name, raw, rule", [b for b in BAD if b[0] in envs.VARIABLES])
def test_each_variables_own_function_raises_too(monkeypatch, tmp_path, name, raw, rule):
    monkeypatch.setenv(name, raw(tmp_path))
    with pytest.raises(ValueError, match=re.escape(name)):
        envs.VARIABLES[name]()


def test_check_all_names_every_bad_variable_in_one_line(monkeypatch):
    monkeypatch.setenv("DCPP_PROFILE_REPEATS", "0")
    monkeypatch.setenv("DCPP_METRICS_HOST", "a b")
    with pytest.raises(ValueError) as e:
        envs.check_all()
    msg = str(e.value)
    assert "DCPP_PROFILE_REPEATS='0'" in msg and "DCPP_METRICS_HOST='a b'" in msg
    assert "\n" not in msg


def test_defaults_and_good_values(monkeypatch, tmp_path):
    assert envs.check_all() == {
        "DCPP_CACHE_DIR": Path("~/.cache/dcpp/profiles").expanduser(),
        "DCPP_PROFILE_TIMEOUT_S": 200.0, "DCPP_PROFILE_REPEATS": 2,
        "DCPP_BUBBLE_SAMPLE_EVERY": 0, "DCPP_METRICS_HOST": "127.0.0.1",
        "DCPP_NIXL_PROGRESS_THREAD": True}
    for name in envs.VARIABLES:  # empty or blank: the default
        monkeypatch.setenv(name, "  ")
    assert envs.check_all()["DCPP_METRICS_HOST"] == "127.0.0.1"
    assert envs.cache_dir() == Path("~/.cache/dcpp/profiles").expanduser()
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path / "not" / "yet"))  # created on save
    monkeypatch.setenv("DCPP_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("DCPP_BUBBLE_SAMPLE_EVERY", "4")
    monkeypatch.setenv("DCPP_NIXL_PROGRESS_THREAD", " 0")
    values = envs.check_all()
    assert values["DCPP_NIXL_PROGRESS_THREAD"] is False
    assert values["DCPP_CACHE_DIR"] == tmp_path / "not" / "yet"
    assert values["DCPP_METRICS_HOST"] == "0.0.0.0" and values["DCPP_BUBBLE_SAMPLE_EVERY"] == 4
    assert not (tmp_path / "not").exists()  # checking creates nothing


def test_config_and_startup_profile_read_the_cache_dir_through_envs(monkeypatch, tmp_path):
    from dcpp.config import ProfilingChunkConfig

    monkeypatch.setenv("DCPP_CACHE_DIR", str(_bad_file(tmp_path)))
    with pytest.raises(ValueError, match="DCPP_CACHE_DIR"):
        ProfilingChunkConfig().resolved_cache_dir()
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path / "c"))
    assert ProfilingChunkConfig().resolved_cache_dir() == tmp_path / "c"


_RAW_READ = re.compile(r"""(environ\.get|getenv|environ\[)\s*\(?\s*["']DCPP_""")


def test_every_dcpp_variable_is_registered_and_read_only_in_envs():
    """A DCPP_* name anywhere in dcpp's code is one `envs.VARIABLES` knows, and no module but
    envs.py reads one from os.environ (demo.py only sets them for its engines)."""
    unknown, raw_reads = {}, []
    for path in sorted((ROOT / "dcpp").rglob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        for name in set(re.findall(r"\bDCPP_[A-Z0-9_]*[A-Z0-9]", text)):
            if name not in envs.VARIABLES:
                unknown.setdefault(name, []).append(rel)
        if path.name != "envs.py" and _RAW_READ.search(text):
            raw_reads.append(rel)
    assert not unknown, f"DCPP_* names not in dcpp.envs.VARIABLES: {unknown}"
    assert not raw_reads, f"read DCPP_* from os.environ outside dcpp/envs.py: {raw_reads}"


# --- the plugin's config hook (a fake VllmConfig: no vLLM needed) ----------------------------
@pytest.fixture
def plugin(monkeypatch):
    from dcpp.integration.vllm import plugin, vllm_compat

    monkeypatch.setattr(plugin, "_platform_module", lambda: "vllm.platforms.cpu")
    monkeypatch.setattr(vllm_compat, "platform_is_cpu", lambda: False)
    return plugin


@pytest.mark.parametrize("name, raw, rule", BAD)
def test_configure_engine_rejects_a_bad_variable_before_touching_the_config(
        plugin, monkeypatch, tmp_path, name, raw, rule):
    cfg = fake_vllm_config()
    monkeypatch.setenv(name, raw(tmp_path))
    with pytest.raises(ValueError, match=re.escape(name)):
        plugin.configure_engine(cfg, None)
    assert cfg.scheduler_config.scheduler_cls is None  # dcpp's scheduler not installed
    assert cfg.parallel_config.worker_extension_cls == ""


def test_configure_engine_with_good_variables_installs_dcpp(plugin, monkeypatch, tmp_path):
    from dcpp.integration.vllm import SCHEDULER_CLS

    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DCPP_PROFILE_REPEATS", "3")
    cfg = fake_vllm_config()
    plugin.configure_engine(cfg, None)
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS


def test_bad_variable_does_not_matter_while_dcpp_is_off(plugin, monkeypatch):
    monkeypatch.setenv("DCPP_PROFILE_REPEATS", "0")
    cfg = fake_vllm_config(extra={"enabled": False})
    plugin.configure_engine(cfg, None)  # vLLM exactly as without dcpp
    cfg.additional_config = {}
    plugin.configure_engine(cfg, None)
    assert cfg.scheduler_config.scheduler_cls is None
