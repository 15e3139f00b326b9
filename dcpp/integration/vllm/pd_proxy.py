"""One OpenAI endpoint in front of a prefill/decode pair of vLLM servers (PD disaggregation).

For each completion request (``/v1/completions`` or ``/v1/chat/completions``):

1. the prompt goes to the prefill server P with ``max_tokens`` 1, no streaming, and
   ``kv_transfer_params`` asking for a remote decode; P computes the KV (chunked as dcpp
   sizes it, where dcpp runs on P) and answers with the parameters that locate it;
2. the client's request goes to the decode server D with those parameters; D gets the KV
   from P over the KV connector (NIXL) and decodes; D's answer (streamed or not) is the
   client's answer.

Both requests carry the same ``X-Request-Id`` (the client's, else a new one): vLLM's NIXL
push connector matches P's finished blocks to D's registration by that id, so without it the
KV never reaches D and P frees it when its lease ends.

Failures are the client's to see, in OpenAI's error form, within bounded time: D is checked
before P does any work (``/health``), an unreachable or failing server gives 502/503 naming
it, P's own errors are passed on. A client that disconnects cancels the request in flight
(P's or D's), and vLLM aborts it there, freeing its blocks.

Run: ``python -m dcpp.integration.vllm.pd_proxy --prefill http://P --decode http://D
--port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False,
                 "remote_engine_id": None, "remote_block_ids": None,
                 "remote_host": None, "remote_port": None}
"""``kv_transfer_params`` of the prefill request: P keeps the KV for a remote decode."""

ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ProxyConfig:
    prefill: str
    """Base URL of P (``http://host:port``)."""
    decode: str
    """Base URL of D."""
    connect_timeout_s: float = 10.0
    """Longest wait for a TCP connection to P or D."""
    health_timeout_s: float = 5.0
    """Longest wait for D's ``/health`` before P is asked to prefill."""
    request_timeout_s: float = 1800.0
    """Longest wait for P's prefill answer and for D's whole answer."""


def prefill_body(body: dict) -> dict:
    """The request P gets: one token, not streamed, KV kept for D."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(REMOTE_DECODE))
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.pop("min_tokens", None)
    return out


def decode_body(body: dict, kv_transfer_params: dict) -> dict:
    """The request D gets: the client's, with the KV's location from P."""
    return dict(body, kv_transfer_params=kv_transfer_params)


def error_response(status: int, message: str) -> web.Response:
    err = {"error": {"message": message, "type": "pd_proxy_error", "code": status}}
    return web.json_response(err, status=status)


class PDProxy:
    """The aiohttp handlers; one ``ClientSession`` for both servers."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                        sock_connect=self.config.connect_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout)

    async def close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.close)
        for route in ROUTES:
            app.router.add_post(route, self.completion)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        return app

    async def _healthy(self, base: str) -> str | None:
        """None if ``base``/health answers 200 in time, else why not."""
        assert self.session is not None
        try:
            async with self.session.get(base + "/health", timeout=aiohttp.ClientTimeout(
                    total=self.config.health_timeout_s)) as resp:
                return None if resp.status == 200 else f"/health answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

    async def health(self, request: web.Request) -> web.Response:
        for name, base in (("prefill", self.config.prefill), ("decode", self.config.decode)):
            if (why := await self._healthy(base)) is not None:
                return error_response(503, f"{name} server {base} is not healthy: {why}")
        return web.json_response({"prefill": self.config.prefill,
                                  "decode": self.config.decode})

    async def models(self, request: web.Request) -> web.Response:
        assert self.session is not None
        try:
            async with self.session.get(self.config.decode + "/v1/models") as resp:
                return web.json_response(await resp.json(), status=resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return error_response(502, f"decode server {self.config.decode}: {e}")

    async def completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            return error_response(400, f"request body is not JSON: {e}")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        if body.get("kv_transfer_params") is not None:
            return error_response(400, "kv_transfer_params is set by the proxy; drop it "
                                       "from the request")
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"X-Request-Id": request_id}
        if (why := await self._healthy(self.config.decode)) is not None:
            return error_response(503, f"decode server {self.config.decode} is not healthy "
                                       f"({why}); the prompt was not sent to prefill")
        kv_params = await self._prefill(request.path, body, headers)
        if isinstance(kv_params, web.Response):
            return kv_params
        return await self._decode(request, decode_body(body, kv_params), headers)

    async def _prefill(self, path: str, body: dict,
                       headers: dict) -> dict | web.Response:
        """P's ``kv_transfer_params``, or the error response for the client."""
        assert self.session is not None
        base = self.config.prefill
        try:
            async with self.session.post(base + path, json=prefill_body(body),
                                         headers=headers) as resp:
                text = await resp.text()
                if resp.status != 200:
                    return web.Response(status=resp.status, text=text,
                                        content_type="application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return error_response(502, f"prefill server {base} failed: "
                                       f"{type(e).__name__}: {e}")
        params = json.loads(text).get("kv_transfer_params")
        if not isinstance(params, dict):
            return error_response(502, f"prefill server {base} answered without "
                                       "kv_transfer_params: start it with --kv-transfer-config "
                                       "and kv_role kv_producer (or kv_both)")
        return params

    async def _decode(self, request: web.Request, body: dict,
                      headers: dict) -> web.StreamResponse:
        assert self.session is not None
        base = self.config.decode
        out: web.StreamResponse | None = None
        try:
            async with self.session.post(base + request.path, json=body,
                                         headers=headers) as resp:
                if resp.status != 200 or not body.get("stream"):
                    return web.Response(status=resp.status, body=await resp.read(),
                                        content_type=resp.content_type)
                out = web.StreamResponse(status=200, headers={
                    "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
                    "X-Request-Id": headers["X-Request-Id"]})
                await out.prepare(request)
                async for data in resp.content.iter_any():
                    await out.write(data)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            message = f"decode server {base} failed: {type(e).__name__}: {e}"
            if out is None:
                return error_response(502, message)
            # Headers are sent: end the stream with an error event the client can read.
            payload = json.dumps({"error": {"message": message, "code": 502}})
            await out.write(f"data: {payload}\n\n".encode())
            await out.write_eof()
            return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcpp.integration.vllm.pd_proxy",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", required=True, help="prefill server's base URL (http://host:port)")
    p.add_argument("--decode", required=True, help="decode server's base URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--connect-timeout", type=float, default=ProxyConfig.connect_timeout_s)
    p.add_argument("--request-timeout", type=float, default=ProxyConfig.request_timeout_s)
    args = p.parse_args(argv)
    for flag in ("prefill", "decode"):
        url = getattr(args, flag)
        if not url.startswith(("http://", "https://")):
            p.error(f"--{flag} {url!r}: give a base URL such as http://127.0.0.1:8100")
        setattr(args, flag, url.rstrip("/"))
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port}: give a TCP port in 1-65535")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = ProxyConfig(prefill=args.prefill, decode=args.decode,
                         connect_timeout_s=args.connect_timeout,
                         request_timeout_s=args.request_timeout)
    # handler_cancellation: a client that disconnects cancels the handler, which closes the
    # connection to P or D, and vLLM aborts the request there.
    web.run_app(PDProxy(config).app(), host=args.host, port=args.port,
                handler_cancellation=True, print=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    main()
