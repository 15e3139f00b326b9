"""A stand-in for vLLM's OpenAI server, for `serve_load.py`'s own logic without an engine:
``/health`` and streaming ``/v1/completions`` with ``token_ids`` (greedy: the output depends
only on the prompt), a prefill delay proportional to the prompt, the usage chunk. It prints
dcpp's start-up line when started with ``--additional-config`` (as the dcpp server logs it).

    python fake_openai_server.py --port P [any of vLLM's flags]
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

SECONDS_PER_PROMPT_TOKEN = 2e-5


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt, n = body["prompt"], body["max_tokens"]
    resp = web.StreamResponse()
    await resp.prepare(request)
    await asyncio.sleep(len(prompt) * SECONDS_PER_PROMPT_TOKEN)
    for k in range(n):
        chunk = {"choices": [{"text": "", "token_ids": [(sum(prompt) + k) % 500]}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.002)
    usage = {"choices": [], "usage": {"prompt_tokens": len(prompt),
                                      "prompt_tokens_details": {"cached_tokens": 0}}}
    await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    if "--additional-config" in argv:
        print("dcpp: dynamic chunked prefill on", flush=True)
    print("flags:", " ".join(argv), flush=True)
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
