"""`benchmarks/scheduler_overhead.py` still runs (a few steps, one concurrency): the benchmark
drives vLLM's real scheduler and dcpp's through dcpp's harness, so a rename on either side
breaks it without any other test noticing. Checks the report's fields, not its timings."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from vllm_testlib import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

BENCH = pathlib.Path(__file__).resolve().parents[3] / "benchmarks" / "scheduler_overhead.py"


def test_scheduler_overhead_benchmark_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("scheduler_overhead", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out.json"
    assert bench.main(["--steps", "40", "--concurrency", "2", "--repeats", "2",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["runs"]["2"]
    assert row["steps_run"] == 40 and 0 < row["steps_timed"] <= 40
    assert row["planner_calls"] >= 0 and len(row["added_p99_ms_repeats"]) == 2
    for key in ("vllm_schedule_ms", "dcpp_schedule_ms", "vllm_update_ms", "dcpp_update_ms"):
        p50, p99 = row[key]
        assert 0 < p50 <= p99
    assert report["plan_1m"]["chunks"] > 1
    assert "planning one" in capsys.readouterr().out
