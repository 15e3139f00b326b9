"""dcpp's PD proxy on its own (no vLLM server): the requests it builds for P and D, its
command-line checks, and its answers when a server is missing (a real proxy on a real port,
pointed at ports nothing listens on). The pair end to end: test_vllm_pd_pair.py."""

from __future__ import annotations

import asyncio
import time

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="needs aiohttp (comes with dcpp[vllm])")
from aiohttp import web  # noqa: E402

from dcpp.integration.vllm import pd_proxy  # noqa: E402
from dcpp.tooling.harness import free_port  # noqa: E402


def test_the_prefill_request_asks_for_one_token_kept_for_a_remote_decode():
    client = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 64, "stream": True,
              "stream_options": {"include_usage": True}, "min_tokens": 4,
              "vllm_xargs": {"dcpp_plan": "off"}, "cache_salt": "s"}
    p = pd_proxy.prefill_body(client)
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert "min_tokens" not in p
    assert p["kv_transfer_params"]["do_remote_decode"] is True
    assert p["kv_transfer_params"]["do_remote_prefill"] is False
    # dcpp's per-request options and the prefix-cache salt reach P unchanged.
    assert p["vllm_xargs"] == {"dcpp_plan": "off"} and p["cache_salt"] == "s"
    assert client["max_tokens"] == 64 and "kv_transfer_params" not in client  # not mutated
    chat = pd_proxy.prefill_body({"messages": [], "max_completion_tokens": 9})
    assert chat["max_completion_tokens"] == 1


def test_the_decode_request_is_the_clients_with_ps_parameters():
    client = {"model": "m", "prompt": [5], "max_tokens": 64, "stream": True}
    params = {"do_remote_prefill": True, "remote_engine_id": "e", "pp_size": 2}
    d = pd_proxy.decode_body(client, params)
    assert d == dict(client, kv_transfer_params=params)


@pytest.mark.parametrize("argv, message", [
    (["--prefill", "127.0.0.1:1", "--decode", "http://x:2"], "--prefill '127.0.0.1:1'"),
    (["--prefill", "http://x:1", "--decode", "x:2"], "--decode 'x:2'"),
    (["--prefill", "http://x:1", "--decode", "http://x:2", "--port", "0"], "--port 0"),
])
def test_bad_command_lines_name_the_value_and_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pd_proxy.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "http://127.0.0.1:8100" in err or "1-65535" in err


def test_trailing_slashes_are_dropped():
    args = pd_proxy.parse_args(["--prefill", "http://a:1/", "--decode", "http://b:2"])
    assert (args.prefill, args.decode) == ("http://a:1", "http://b:2")


async def _serve_and_ask(config, requests):
    runner = web.AppRunner(pd_proxy.PDProxy(config).app(), handler_cancellation=True)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    out = []
    try:
        async with aiohttp.ClientSession() as s:
            for method, path, payload in requests:
                started = time.monotonic()
                async with s.request(method, f"http://127.0.0.1:{port}{path}",
                                     data=payload) as r:
                    out.append((r.status, await r.json(), time.monotonic() - started))
    finally:
        await runner.cleanup()
    return out


def test_missing_servers_and_bad_bodies_get_clear_errors_at_once():
    p, d = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    config = pd_proxy.ProxyConfig(prefill=p, decode=d, health_timeout_s=2.0)
    good = '{"model": "m", "prompt": [1, 2], "max_tokens": 4}'
    answers = asyncio.run(_serve_and_ask(config, [
        ("POST", "/v1/completions", good),
        ("POST", "/v1/chat/completions", good),
        ("POST", "/v1/completions", "not json"),
        ("POST", "/v1/completions", "[1, 2]"),
        ("POST", "/v1/completions", '{"prompt": [1], "kv_transfer_params": {}}'),
        ("GET", "/health", None),
    ]))
    (s1, e1, t1), (s2, e2, _), (s3, e3, _), (s4, e4, _), (s5, e5, _), (s6, e6, _) = answers
    assert s1 == s2 == 503 and t1 < 5
    assert f"decode server {d} is not healthy" in e1["error"]["message"]
    assert "not sent to prefill" in e1["error"]["message"]
    assert s3 == s4 == s5 == 400
    assert "not JSON" in e3["error"]["message"]
    assert "JSON object" in e4["error"]["message"]
    assert "kv_transfer_params is set by the proxy" in e5["error"]["message"]
    assert s6 == 503 and f"prefill server {p}" in e6["error"]["message"]
