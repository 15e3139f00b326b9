"""`dcpp profile --reference` writes a profile that `dcpp plan` and `dcpp timeline` accept."""

import json
import re

import pytest

from dcpp.chunker.profiler import Profile
from dcpp.cli import main


def test_profile_reference_round_trips_through_plan(tmp_path, capsys):
    out = tmp_path / "p.json"
    # Passes of tens of ms, each design point timed 3 times (the fastest counts): a fit that
    # survives a busy 2-core machine.
    assert main(["profile", "--reference", "--pp", "2", "--max-num-batched-tokens", "1024",
                 "--max-model-len", "4096", "--num-samples", "24", "--repeats", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "24 timed passes" in text and "fit (" in text and "median relative error" in text
    prof = Profile.load(out)
    assert prof.num_passes == 24 and prof.scope == "stage"
    assert prof.cache_key["pipeline_parallel_size"] == 2
    assert main(["plan", "--profile", str(out), "--pp", "2", "--seq-len", "4096",
                 "--max-num-batched-tokens", "1024", "--min-chunk", "128", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert sum(plans["plans"]["default"]["chunks"]) == 4096
    assert plans["plans"]["default"]["ttft"] <= plans["plans"]["equal_time"]["ttft"] * (1 + 1e-9)
    assert plans["plans"]["static"]["chunks"] == [1024] * 4


def test_timeline_cli_writes_png_and_svg(tmp_path, capsys):
    assert main(["timeline", "--seq-len", "8192", "--pp", "4", "--max-num-batched-tokens",
                 "2048", "--cost", "1e-9,1e-5,0.002", "--min-chunk", "256",
                 "--out", str(tmp_path / "tl")]) == 0
    assert "wrote" in capsys.readouterr().out
    svg = (tmp_path / "tl.svg").read_text()
    assert (tmp_path / "tl.png").read_bytes()[:4] == b"\x89PNG"
    static = re.findall(r'id="static \(4 chunks\)-stage(\d)-chunk(\d+)"', svg)
    assert len(static) == 16 and {s for s, _ in static} == {"0", "1", "2", "3"}


@pytest.mark.parametrize("argv, msg", [
    (["timeline", "--seq-len", "100", "--pp", "2", "--max-num-batched-tokens", "64",
      "--cost", "1,1,1", "--plans", "static,bogus", "--out", "x"], "--plans entry 'bogus'"),
    (["profile", "--vllm", "m", "--checkpoint", "c", "--out", "x"], "--checkpoint goes with"),
    (["profile", "--reference", "--num-samples", "0", "--out", "x"], "--num-samples=0"),
])
def test_cli_bad_arguments(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["not json", "wrong shape", "missing"])
def test_malformed_or_missing_profile_is_one_line_naming_the_file(tmp_path, capsys, damage):
    path = tmp_path / "p.json"
    if damage == "not json":
        path.write_text("{")
    elif damage == "wrong shape":
        path.write_text(json.dumps({"samples": 3}))
    argv = ["plan", "--profile", str(path), "--pp", "2", "--seq-len", "4096",
            "--max-num-batched-tokens", "1024"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_out_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "tl"  # a directory that cannot exist
    assert main(["timeline", "--seq-len", "4096", "--pp", "2", "--max-num-batched-tokens",
                 "1024", "--cost", "1e-9,1e-5,0.002", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a-file" in err and err.count("\n") == 1 and "Traceback" not in err
