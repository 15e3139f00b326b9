"""dcpp as the prefill node of a PD pair: P (PP=2, dcpp on, NIXL push producer), D (PP=1,
consumer) and dcpp's proxy, all real processes on loopback (`dcpp.tooling.pd_pair`).

Greedy tokens through the pair equal D's own run of the prompt (its prefix cache kept apart
by ``cache_salt``), with dcpp's plan and with vLLM's chunks on P, for a long prompt and for a
prefix-cache hit on P; the KV really crosses over NIXL (its transfer counters move); an abort
while P prefills leaves no block held on either side; a stopped D gives the client a clear
error at once and leaves P serving; stopping the pair leaves no process and no shared memory.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import vllm_testlib as lib

from dcpp.tooling.harness import is_alive
from dcpp.tooling.pd_pair import metric_sum as metric

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not lib.vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        return False
    return True


if not nixl_available():
    pytestmark.append(pytest.mark.skip(reason="needs nixl (pip install dcpp[pd])"))

PROMPT_LEN = 6000  # BUDGET 512: a dozen chunks on P


def post(base: str, payload: dict, *, timeout: float = 300.0) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def tokens(model: str, prompt: list[int], salt: str, **xargs) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "return_token_ids": True, "cache_salt": salt}
    if xargs:
        body["vllm_xargs"] = xargs
    return body


def token_ids(answer: dict) -> list[int]:
    return answer["choices"][0]["token_ids"]


def transfers(pair) -> float:
    return sum(metric(s.base, "vllm:nixl_bytes_transferred_count")
               for s in (pair.prefill, pair.decode))


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, profile_cache_dir, tmp_path_factory):
    from dcpp.tooling.pd_pair import PairConfig, PDPair

    shm_before = set(os.listdir("/dev/shm"))
    cfg = PairConfig(model=str(tiny_checkpoint), budget=lib.BUDGET,
                     max_model_len=lib.MAX_MODEL_LEN,
                     dcpp={"enabled": True, "min_chunk": lib.MIN_CHUNK})
    pd = PDPair(cfg, log_dir=tmp_path_factory.mktemp("pd_pair"))
    with pd:
        pd.shm_before = shm_before
        yield pd


def test_greedy_tokens_through_the_pair_equal_a_single_instance(pair):
    model = pair.cfg.model
    prompt = lib.prompt(PROMPT_LEN, seed=11)
    status, ref = post(pair.decode.base, tokens(model, prompt, "ref"))
    assert status == 200, ref
    for salt, xargs in (("dcpp", {}), ("static", {"dcpp_plan": "off"})):
        before = transfers(pair)
        status, out = post(pair.client, tokens(model, prompt, salt, **xargs))
        assert status == 200, out
        assert token_ids(out) == token_ids(ref), salt
        assert out["usage"]["prompt_tokens"] == PROMPT_LEN
        # The KV came over NIXL (one write per PP rank of P), not recomputed on D.
        assert transfers(pair) >= before + 2, salt
    assert "dcpp: dynamic chunked prefill on" in pair.prefill.log_tail(500_000)


def test_prefix_cache_hit_on_the_prefill_node(pair):
    model = pair.cfg.model
    first = lib.prompt(PROMPT_LEN, seed=12)
    status, _ = post(pair.client, tokens(model, first, "hit"))
    assert status == 200
    second = first[:4096] + lib.prompt(1500, seed=13)
    hits = metric(pair.prefill.base, "vllm:prefix_cache_hits_total")
    status, out = post(pair.client, tokens(model, second, "hit"))
    assert status == 200, out
    assert metric(pair.prefill.base, "vllm:prefix_cache_hits_total") - hits >= 4096 - 16
    status, ref = post(pair.decode.base, tokens(model, second, "ref-hit"))
    assert status == 200, ref
    assert token_ids(out) == token_ids(ref)


def wait_idle(base: str, timeout_s: float) -> tuple[float, float]:
    """(running requests, KV cache usage) once both are 0, or their last values."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = (metric(base, "vllm:num_requests_running"),
                 metric(base, "vllm:kv_cache_usage_perc"))
        if state == (0.0, 0.0) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def test_an_abort_while_prefilling_holds_no_blocks(pair):
    body = tokens(pair.cfg.model, lib.prompt(lib.MAX_MODEL_LEN - 512, seed=14), "abort")
    host, port = pair.client.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(dict(body, stream=True)),
                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while metric(pair.prefill.base, "vllm:num_requests_running") == 0:
        assert time.monotonic() < deadline, "P never started the request"
        time.sleep(0.2)
    assert metric(pair.prefill.base, "vllm:kv_cache_usage_perc") > 0
    conn.close()  # the client goes away mid-prefill
    assert wait_idle(pair.prefill.base, 60) == (0.0, 0.0)
    assert wait_idle(pair.decode.base, 10) == (0.0, 0.0)
    # Both still serve.
    status, _ = post(pair.client, tokens(pair.cfg.model, lib.prompt(300, seed=15), "after"))
    assert status == 200


def test_a_stopped_decode_server_is_a_clear_error_and_prefill_keeps_serving(pair):
    model = pair.cfg.model
    assert pair.decode.stop() == []
    started = time.monotonic()
    status, out = post(pair.client, tokens(model, lib.prompt(2000, seed=16), "down"),
                       timeout=60)
    assert time.monotonic() - started < 15
    assert status == 503
    assert "decode server" in out["error"]["message"]
    assert pair.decode.base in out["error"]["message"]
    status, out = post(pair.prefill.base, tokens(model, lib.prompt(2000, seed=16), "p"))
    assert status == 200 and len(token_ids(out)) == 8
    assert wait_idle(pair.prefill.base, 10) == (0.0, 0.0)


def test_stopping_the_pair_leaves_nothing_behind(pair):
    procs = pair.processes()
    assert procs, "the pair's processes were not recorded"
    assert pair.stop() == [], "some processes had to be killed"
    assert [p.pid for p in procs if is_alive(p)] == []
    left = sorted(set(os.listdir("/dev/shm")) - pair.shm_before)
    assert left == [], f"shared memory left in /dev/shm: {left}"
