"""Every user error of the command line is one line on stderr and a non-zero exit status (2: a
bad argument or input file; 1: a run that failed), never a traceback; dcpp's own bugs keep
theirs. No vLLM engine is started: vLLM's absence and an engine that does not start are
simulated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcpp import envs
from dcpp.cli import main

ROOT = Path(__file__).resolve().parents[1]
PLAN = ["plan", "--pp", "2", "--seq-len", "4096", "--max-num-batched-tokens", "1024",
        "--min-chunk", "128"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (*envs.VARIABLES, "VLLM_ENGINE_READY_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


def run(argv, capsys, code):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.startswith(f"dcpp {argv[0]}: error: "), err
    return err


# --- dcpp profile --vllm ---------------------------------------------------------------------
def test_vllm_not_installed(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError
    err = run(["profile", "--vllm", "org/model", "--out", str(tmp_path / "p.json")], capsys, 1)
    assert "vLLM, which is not installed" in err and "pip install 'dcpp[vllm]'" in err


def test_vllm_that_does_not_import(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kw):
        if name == "vllm":
            raise ImportError("libcudart.so.12: cannot open shared object file", name="torch")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    err = run(["profile", "--vllm", "org/model", "--out", str(tmp_path / "p.json")], capsys, 1)
    assert "vLLM is installed but does not import" in err and "libcudart" in err


@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM "importable" and `harness.start_engine` replaced: set `.error` to what it raises."""
    from dcpp import profiling
    from dcpp.tooling import harness

    state = type("State", (), {"error": None, "calls": 0})()

    def start_engine(*args, **kw):
        state.calls += 1
        raise state.error

    monkeypatch.setattr(profiling, "_require_vllm", lambda: None)
    monkeypatch.setattr(harness, "start_engine", start_engine)
    return state


def _hook_error(monkeypatch) -> RuntimeError:
    """The RuntimeError dcpp's scheduler raises at start-up on a vLLM without its hook."""
    from dcpp.integration.vllm import vllm_compat

    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: "0.27.1")
    with pytest.raises(RuntimeError) as e:
        vllm_compat.check_scheduler_hook(type("DcppScheduler", (), {}))
    return e.value


@pytest.mark.parametrize("error, words", [
    ("hook", ["RuntimeError", "_reserve_prefill_lookahead", "0.27.1", "Fix: install"]),
    (RuntimeError("Engine core initialization failed. See root cause above."),
     ["RuntimeError", "Engine core initialization failed"]),
    (ValueError("1 validation error for ModelConfig\n  Value error, max_model_len too big"),
     ["ValueError", "max_model_len too big"]),
    (OSError("org/model is not a local folder and is not a valid model identifier"),
     ["OSError", "not a valid model identifier"]),
])
def test_engine_that_does_not_start(fake_vllm, monkeypatch, capsys, tmp_path, error, words):
    fake_vllm.error = _hook_error(monkeypatch) if error == "hook" else error
    err = run(["profile", "--vllm", "org/model", "--out", str(tmp_path / "p.json")], capsys, 1)
    assert "vLLM did not start on org/model" in err
    assert all(w in err for w in words), err
    assert not list(tmp_path.iterdir())  # no profile written


def test_a_bug_in_dcpp_during_engine_start_keeps_its_traceback(fake_vllm, tmp_path):
    fake_vllm.error = TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")
    with pytest.raises(TypeError):
        main(["profile", "--vllm", "org/model", "--out", str(tmp_path / "p.json")])


def test_missing_local_model_folder(fake_vllm, capsys, tmp_path):
    err = run(["profile", "--vllm", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json")],
              capsys, 2)
    assert f"--vllm {tmp_path / 'nope'}: no such model folder" in err
    assert fake_vllm.calls == 0


def test_local_model_with_broken_config_json(fake_vllm, capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{")
    err = run(["profile", "--vllm", str(tmp_path / "m"), "--out", str(tmp_path / "p.json")],
              capsys, 2)
    assert "config.json is not valid JSON" in err and fake_vllm.calls == 0


def test_bad_environment_variable_before_vllm_starts(fake_vllm, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DCPP_PROFILE_REPEATS", "lots")
    err = run(["profile", "--vllm", "org/model", "--out", str(tmp_path / "p.json")], capsys, 2)
    assert "DCPP_PROFILE_REPEATS='lots'" in err and fake_vllm.calls == 0


# --- dcpp profile --reference ----------------------------------------------------------------
def _checkpoint(tmp_path, config) -> Path:
    path = tmp_path / "ck"
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2}


@pytest.mark.parametrize("config, words", [
    (None, ["does not exist"]),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, ["lacks the key 'hidden_size'"]),
    ("{not json", ["not valid JSON"]),
    ([1, 2], ["expected a JSON object"]),
    ({**LLAMA, "model_type": "gpt2"}, ["expected a Llama checkpoint"]),
    (LLAMA, ["no *.safetensors file"]),
])
def test_bad_checkpoint_folder(capsys, tmp_path, config, words):
    ck = tmp_path / "missing" if config is None else _checkpoint(tmp_path, config)
    err = run(["profile", "--reference", "--checkpoint", str(ck), "--out",
               str(tmp_path / "p.json")], capsys, 2)
    assert str(ck) in err and all(w in err for w in words), err


def test_unreadable_safetensors(capsys, tmp_path):
    ck = _checkpoint(tmp_path, LLAMA)
    (ck / "model.safetensors").write_bytes(b"garbage")
    err = run(["profile", "--reference", "--checkpoint", str(ck), "--out",
               str(tmp_path / "p.json")], capsys, 2)
    assert "model.safetensors: not a readable safetensors file" in err


def test_rejected_fit_is_a_failed_run(monkeypatch, capsys, tmp_path):
    from dcpp import profiling
    from dcpp.chunker.latency_model import FitError

    def no_fit(*args, **kw):
        raise FitError("median relative error 40% > 15%")

    monkeypatch.setattr(profiling, "profile", no_fit)
    err = run(["profile", "--reference", "--out", str(tmp_path / "p.json")], capsys, 1)
    assert "did not fit a latency model" in err and "40%" in err and "--repeats" in err


# --- dcpp plan / timeline inputs -------------------------------------------------------------
@pytest.mark.parametrize("cost, words", [
    ("1,2", "must be three numbers"),
    ("a,b,c", "must be three numbers"),
    ("-1,0,0", "finite and >= 0"),
    ("inf,0,0", "finite and >= 0"),
])
def test_bad_cost(capsys, cost, words):
    err = run([*PLAN, f"--cost={cost}"], capsys, 2)
    assert f"--cost {cost!r}" in err and words in err


@pytest.mark.parametrize("content", [
    '{"format": 1, "model": {"alpha": null, "beta": 0, "gamma": 0, "delta": 0, "c": 0}}',
    '{"format": 1, "model": {"alpha": 0, "beta": 0, "gamma": 0, "delta": 0, "c": 0}, '
    '"samples": [[1, 2]]}',
    '{"format": 1, "model": {"alpha": 0, "beta": 0, "gamma": 0, "delta": 0, "c": 0}, '
    '"cache_key": [1]}',
    '{"format": 1}',
    '[1, 2, 3]',
])
def test_profile_of_the_wrong_shape(capsys, tmp_path, content):
    from dcpp.chunker.profiler import FORMAT_VERSION

    path = tmp_path / "p.json"
    path.write_text(content.replace('"format": 1', f'"format": {FORMAT_VERSION}'))
    err = run([*PLAN, "--profile", str(path)], capsys, 2)
    assert f"--profile {path}: not a readable dcpp profile" in err


def test_profile_that_is_a_directory(capsys, tmp_path):
    err = run([*PLAN, "--profile", str(tmp_path)], capsys, 2)
    assert str(tmp_path) in err


# --- the real process: exactly one line on stderr --------------------------------------------
@pytest.mark.parametrize("code, argv, code_expected, words", [
    ("", [*PLAN, "--cost", "1,2"], 2, "--cost '1,2' must be three numbers"),
    ("sys.modules['vllm'] = None; ", ["profile", "--vllm", "org/m", "--out", "p.json"], 1,
     "not installed"),
])
def test_one_line_on_stderr_of_the_process(tmp_path, code, argv, code_expected, words):
    prog = f"import sys; {code}from dcpp.cli import main; sys.exit(main({argv!r}))"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("DCPP_")}
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == code_expected, res.stderr
    assert res.stderr.count("\n") == 1 and words in res.stderr, res.stderr
    assert res.stdout == ""


def test_module_entry_point_usage_error_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dcpp.cli", *PLAN, "--cost", "x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "--cost 'x' must be three numbers" in res.stderr
