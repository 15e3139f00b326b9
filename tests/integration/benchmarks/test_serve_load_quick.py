"""`benchmarks/serve_load.py --quick` end to end: the real OpenAI server (PP=2, prefix caching,
dcpp on, the word-level tokenizer) under concurrent streaming clients and vLLM's own client
(`vllm bench serve`, workload vllm-random), every workload and every mode kind (vLLM's,
dcpp's plans, a fixed chunk) beside a plain vLLM server with `--long-prefill-token-threshold
512`: every request completes and greedy outputs are identical across modes and servers.
Timings are not checked (performance lives in the benchmark's output, not in tests).

The benchmark starts the server as its child; whatever happens here (failure, timeout), the
benchmark's whole process tree is stopped and reaped by PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_testlib as lib

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not lib.vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "serve_load.py"
TIMEOUT_S = 1200  # ~5 min here (two servers); one start-up took ~4 min at load 10


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_load")
    json_path = out / "quick.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(out), "--json",
           str(json_path), "--cache-dir", str(out / "profiles")]
    log_path = out / "bench.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # The benchmark stops its server on SIGINT/SIGTERM; anything left is killed.
            killed = lib.stop_process_tree(proc, signal.SIGINT, timeout=60)
    text = log_path.read_text(errors="replace")
    server_log = out / "serve_load_quick_server.log"
    server_tail = server_log.read_text(errors="replace")[-3000:] if server_log.exists() else ""
    if rc is None:
        pytest.fail(f"serve_load.py --quick still running after {TIMEOUT_S} s:\n{text[-3000:]}"
                    f"\nserver log tail:\n{server_tail}")
    result = json.loads(json_path.read_text()) if json_path.exists() else None
    return {"rc": rc, "log": text, "server_tail": server_tail, "json": result,
            "killed": killed, "out": out}


def test_every_request_completes_with_identical_greedy_outputs(quick_run):
    r = quick_run
    assert r["json"] is not None, f"no JSON (exit {r['rc']}):\n{r['log'][-3000:]}\n" \
                                  f"server log tail:\n{r['server_tail']}"
    res = r["json"]
    assert res["all_completed"], {n: s["failed"] for n, s in res["summary"].items()}
    assert res["greedy_identical"], {n: s["greedy_mismatches"][:5]
                                     for n, s in res["summary"].items()}
    assert r["rc"] == 0, r["log"][-3000:]
    for name, s in res["summary"].items():
        for mode in s["modes"]:
            p = s["pooled"][mode]
            assert p["completed"] == p["requests"] > 0, (name, mode, p)
        # Every mode's outputs were compared with vLLM's, request by request (hol: the long
        # prompt alone and the short requests idle too).
        per_mode = s["pooled"]["off"]["requests"] * (2 if name == "hol" else 1)
        assert s["greedy_compared"] == (len(s["modes"]) - 1) * per_mode
    assert not r["killed"], f"processes outlived the benchmark and were killed: {r['killed']}"


def test_json_has_the_fields(quick_run):
    res = quick_run["json"]
    assert res is not None, quick_run["log"][-3000:]
    assert set(res["summary"]) == {"single-long", "varlen-c4", "prefix-c4", "mixed-c16",
                                   "hol", "vllm-random"}
    assert res["modes"] == ["off", "pipeline", "equal_time", "fixed-512", "lpt-512"]
    assert [s["name"] for s in res["servers"]] == ["dcpp", "lpt-512"]
    assert res["tokenizer"] and "--skip-tokenizer-init" not in res["server_cmd"]
    for name, s in res["summary"].items():
        want = ["off", "pipeline"] if name == "vllm-random" else res["modes"]
        assert s["modes"] == want, name
        for mode in s["modes"]:
            p = s["pooled"][mode]
            for key in ("input_tput", "req_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                        "cached_fraction"):
                assert isinstance(p[key], float) and p[key] == p[key], (name, mode, key, p)
            assert p["input_tput"] > 0 and p["ttft_p50"] > 0
        for mode in s["modes"][1:]:
            ratio = s["vs_off"][mode]["input_tput"]
            assert ratio["median"] > 0 and len(ratio["ci90"]) == 2
        if name != "vllm-random":
            assert s["best_fixed"] == "fixed-512" and "pipeline" in s["vs_best_fixed"]
            assert s["best_threshold"] == "lpt-512" and "pipeline" in s["vs_best_threshold"]
    hol = res["summary"]["hol"]["hol"]
    for mode in res["modes"]:
        for key in ("short_vs_idle", "long_vs_alone"):
            assert hol[mode][key]["median"] > 0, (mode, key, hol[mode])
    # vLLM's own client ran both dcpp modes on the dcpp server.
    rd = res["per_round"]["vllm-random"][0]
    for mode in ("off", "pipeline"):
        assert rd[mode]["client"]["cmd"][:4] == ["-m", "dcpp.integration.vllm.launch", "bench",
                                                 "serve"]
        assert rd[mode]["prompt_tokens"] > 0 and rd[mode]["ttft_p50"] > 0
    # The prefix workload reuses its shared prefix and earlier turns.
    assert res["summary"]["prefix-c4"]["pooled"]["off"]["cached_fraction"] > 0.3
    assert [h["workload"] for h in res["headline"]] == list(res["summary"])
    assert res["rounds"] == 1 and res["per_round"]["single-long"][0]["off"]["requests"] >= 1
    assert (quick_run["out"] / "serve_load_quick.png").stat().st_size > 0
    assert "dcpp: dynamic chunked prefill on" in (
        quick_run["out"] / "serve_load_quick_server.log").read_text()
    assert "dcpp: dynamic chunked prefill on" not in (
        quick_run["out"] / "serve_load_quick_server_lpt-512.log").read_text()
