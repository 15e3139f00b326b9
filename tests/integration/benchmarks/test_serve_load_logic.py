"""`benchmarks/serve_load.py`'s own logic on a stand-in server (`fake_openai_server.py`, no
engine, seconds): servers per threshold beside the dcpp server, the pool that stops and
restarts them when full, rounds paired across servers, the head-of-line workload's three runs
and its ratios against idle runs, the summary, JSON and picture. The real servers run in
`test_serve_load_quick.py`."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from vllm_testlib import vllm_available

pytestmark = [
    pytest.mark.vllm,  # the load client uses vLLM's SSE framing
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

ROOT = Path(__file__).resolve().parents[3]
FAKE = Path(__file__).with_name("fake_openai_server.py")


def load_serve_load():
    if "serve_load" in sys.modules:
        return sys.modules["serve_load"]
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" /
                                                  "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = mod  # its dataclasses look their module up there
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(mod)
    finally:  # its environment defaults (KV space, profiling repeats) are not this session's
        os.environ.clear()
        os.environ.update(saved)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sl = load_serve_load()
    real = sl.load_client.server_command
    commands = []

    def fake(model, **kw):
        cmd = real(model, **kw)
        commands.append(cmd)
        assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        return [sys.executable, str(FAKE)] + cmd[3:]

    out = tmp_path_factory.mktemp("serve_load_logic")
    mp = pytest.MonkeyPatch()
    mp.setattr(sl.load_client, "server_command", fake)
    saved = dict(os.environ)
    try:
        rc = sl.main(["--quick", "--workloads", "single-long,hol", "--thresholds", "0,512",
                      "--rounds", "3", "--max-servers", "2", "--out-dir", str(out),
                      "--cache-dir", str(out / "cache")])
    finally:
        mp.undo()
        os.environ.clear()
        os.environ.update(saved)
    return {"rc": rc, "out": out, "commands": commands,
            "json": json.loads((out / "serve_load_quick.json").read_text())}


def test_runs_every_mode_on_its_server_and_checks_outputs(run):
    res = run["json"]
    assert run["rc"] == 0 and res["all_completed"] and res["greedy_identical"]
    assert [s["name"] for s in res["servers"]] == ["dcpp", "lpt-0", "lpt-512"]
    assert res["modes"] == ["off", "pipeline", "equal_time", "fixed-512", "lpt-0", "lpt-512"]
    for name in ("single-long", "hol"):
        assert res["summary"][name]["modes"] == res["modes"]
        for rd in res["per_round"][name]:
            assert set(rd) == set(res["modes"])
    # A threshold server is plain vLLM with the flag; the dcpp server has no threshold.
    flags = {s["name"]: s["extra_flags"] for s in res["servers"]}
    assert flags == {"dcpp": [], "lpt-0": [], "lpt-512": ["--long-prefill-token-threshold",
                                                          "512"]}
    dcpp_cmds = [c for c in run["commands"] if "--additional-config" in c]
    assert len(dcpp_cmds) == len(res["servers"][0]["starts"])
    assert not any("--long-prefill-token-threshold" in c for c in dcpp_cmds)
    assert all("--skip-tokenizer-init" in c for c in run["commands"])  # no vllm-random here


def test_pool_keeps_at_most_max_servers_and_restarts_them(run):
    res = run["json"]
    starts = {s["name"]: len(s["starts"]) for s in res["servers"]}
    # 3 servers, at most 2 up: every round must start at least one again.
    assert sum(starts.values()) >= 3 + 2, starts
    assert all(n >= 1 for n in starts.values())
    logs = sorted(p.name for p in run["out"].glob("serve_load_quick_server*.log"))
    assert "serve_load_quick_server.log" in logs and any(".start2" in n for n in logs)


def test_hol_ratios_against_idle_runs(run):
    s = run["json"]["summary"]["hol"]
    per_round = run["json"]["per_round"]["hol"]
    for mode in s["modes"]:
        h = s["hol"][mode]
        assert h["short_vs_idle"]["target"] == 2.0 and h["long_vs_alone"]["target"] == 1.05
        assert h["short_vs_idle"]["median"] > 0 and len(h["short_vs_idle"]["ci90"]) == 2
        for rd in per_round:
            r = rd[mode]
            # The short requests arrive while the long one prefills (within its alone TTFT).
            assert len(r["arrivals_s"]) == 4
            assert 0 < r["arrivals_s"][0] < r["arrivals_s"][-1] < r["long_alone_ttft"]
            assert r["short_vs_idle"] == pytest.approx(r["short_ttft_p99"]
                                                       / r["short_idle_ttft_p99"])
            assert r["long_vs_alone"] == pytest.approx(r["long_ttft"] / r["long_alone_ttft"])
    # hol run, long alone, shorts idle: each compared with vLLM's outputs.
    assert s["greedy_compared"] == (len(s["modes"]) - 1) * 3 * 2 * 5
    assert s["best_threshold"] == "lpt-512"  # lpt-0 (a plain server) is never a candidate
    assert "short_ttft_p99" in s["vs_off"]["lpt-512"]
    assert (run["out"] / "serve_load_quick.png").stat().st_size > 0


def test_round_order_rotates_and_reverses():
    load_serve_load()  # puts benchmarks/ on the path
    import serve_servers as ss

    orders = [ss.round_order(["a", "b", "c"], r) for r in range(4)]
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"], ["a", "c", "b"]]
    assert ss.round_order([], 3) == []  # a server with no mode for a workload
    assert ss.mode_xargs("lpt-512") is None
    assert ss.mode_xargs("fixed-256") == {"dcpp_chunk_size": 256}
    assert ss.mode_xargs("off") == {"dcpp_plan": "off"}
