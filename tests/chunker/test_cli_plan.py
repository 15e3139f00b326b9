"""`dcpp plan`: JSON shape, human output, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLAMA8B_P4
from dcpp.chunker.profiler import Profile
from dcpp.cli import main

ARGS = ["plan", "--seq-len", "131072", "--pp", "4", "--max-num-batched-tokens", "32768",
        "--cost", "1.06e-9,5.7e-5,0.012"]


def test_json_shape(capsys):
    assert main(ARGS + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"plans", "lower_bound"}
    assert set(out["plans"]) == {"static", "equal_time", "optimal", "default"}
    for plan in out["plans"].values():
        assert set(plan) == {"chunks", "ttft", "bubble_fraction"}
        assert sum(plan["chunks"]) == 131072 and all(isinstance(c, int) for c in plan["chunks"])
        assert 0 <= plan["bubble_fraction"] < 1
    p = out["plans"]
    assert p["static"]["chunks"] == [32768] * 4
    assert out["lower_bound"] <= p["optimal"]["ttft"] <= p["default"]["ttft"] * (1 + 1e-9)
    assert p["default"]["ttft"] <= min(1.02 * p["optimal"]["ttft"], p["equal_time"]["ttft"])
    # --cost is the whole model; each of the 4 stages takes t/4: static TTFT in closed form.
    t = [1.06e-9 * ((h + 32768) ** 2 - h ** 2) + 5.7e-5 * 32768 + 0.012
         for h in range(0, 131072, 32768)]
    assert p["static"]["ttft"] == pytest.approx((sum(t) + 3 * max(t)) / 4)


def test_human_output_and_profile_file(capsys, tmp_path):
    assert main(ARGS) == 0
    text = capsys.readouterr().out
    for word in ("static", "equal_time", "optimal", "default", "lower bound", "32768x4"):
        assert word in text
    path = Profile(model=LLAMA8B_P4, samples=(), scope="stage").save(tmp_path / "p.json")
    args = ARGS[:-2] + ["--profile", str(path), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["plans"]["default"]["chunks"]


@pytest.mark.parametrize("bad,msg", [
    (["--cost", "1,2"], "three numbers"),
    (["--cost=-1,0,0"], ">= 0"),
    (["--smooth-factor", "1.5"], "smooth_factor=1.5"),
    (["--pp", "1"], "--pp=1"),
    (["--seq-len", "0"], "--seq-len=0"),
    (["--profile", "/nonexistent.json"], "does not exist"),
])
def test_bad_arguments_one_line(capsys, bad, msg):
    args = list(ARGS)
    if bad[0].startswith(("--profile", "--cost=")):
        args = args[:-2]
    if len(bad) == 1:
        args += bad
    for i in range(0, len(bad) - 1, 2):
        if bad[i] in args:
            args[args.index(bad[i]) + 1] = bad[i + 1]
        else:
            args += bad[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and err[0].startswith("dcpp plan: error:")


def test_argparse_errors_are_one_line():
    exe = shutil.which("dcpp", path=str(Path(sys.executable).parent)) or ""
    cmd = [exe] if exe else [sys.executable, "-m", "dcpp.cli"]
    r = subprocess.run(cmd + ["plan", "--seq-len", "10"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "required" in r.stderr
