"""Helpers for the vLLM end-to-end tests: engine start/stop and process clean-up."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

# PP=2 on a 2-core CPU: one OpenMP thread per pipeline rank (DESIGN.md section 3).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Best of 3 per profiling sample: the tiny model's passes take milliseconds, and one noisy
# pass on a shared 2-core runner can push the fit under the chunker's R^2 gate.
os.environ.setdefault("DCPP_PROFILE_REPEATS", "3")

import psutil  # noqa: E402  (a vLLM dependency)

from dcpp.tooling.harness import is_alive as _alive, reap  # noqa: E402,F401
from dcpp.tooling.harness import private_rpc_dir  # noqa: E402

# vLLM's IPC socket files go to a directory of the test session, removed at its end.
private_rpc_dir()

# Tiny Llama shared by the vLLM tests (random init, written locally).
TINY_LAYERS = 4
MAX_MODEL_LEN = 8192
BUDGET = 512  # max_num_batched_tokens: small so prompts of a few thousand tokens take many chunks
MIN_CHUNK = 64


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def prompt(n: int, seed: int = 1) -> list[int]:
    """``n`` token ids drawn from the tiny model's vocabulary, the same for the same seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (n,), generator=g).tolist()


def write_tiny_checkpoint(path: Path) -> Path:
    from dcpp.reference.checkpoint import write_random_llama
    from dcpp.reference.model import ModelConfig

    write_random_llama(path, config=ModelConfig(num_layers=TINY_LAYERS,
                                                max_position_embeddings=MAX_MODEL_LEN), seed=0)
    return path


def alive_descendants() -> list[str]:
    out = []
    for p in descendants():
        if _alive(p):
            try:
                out.append(f"{p.pid}:{p.name()}")
            except psutil.Error:
                pass
    return out


def descendants() -> list:
    """Processes this test process started (directly or not), except Python's multiprocessing
    resource tracker, which lives until this process exits and then ends by itself."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in procs if not _is_resource_tracker(p)]


def _is_resource_tracker(p) -> bool:
    try:
        return any("resource_tracker" in part for part in p.cmdline())
    except psutil.Error:
        return False


class Engine:
    """An `LLM` with its EngineCore in this process (so tests can read the scheduler)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.procs = descendants()

    @property
    def core(self):
        return self.llm.llm_engine.engine_core.engine_core

    @property
    def scheduler(self):
        return self.core.scheduler

    def shutdown(self, procs: list | None = None) -> list[int]:
        """The engine down and ``procs`` reaped (default: its processes and every other
        descendant); returns the pids that had to be killed."""
        if procs is None:
            procs = self.procs + [p for p in descendants()
                                  if p.pid not in {q.pid for q in self.procs}]
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        self.llm = None
        gc.collect()
        return reap(procs)


def make_engine(model_path: Path, **kwargs) -> Engine:
    """Start a PP=2 engine with the EngineCore in-process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    args = dict(
        model=str(model_path), skip_tokenizer_init=True, pipeline_parallel_size=2,
        enable_chunked_prefill=True, max_num_batched_tokens=BUDGET, max_model_len=MAX_MODEL_LEN,
        dtype="float32", seed=0,
    )
    args.update(kwargs)
    before = {p.pid for p in descendants()}
    try:
        llm = LLM(**args)
    except BaseException:
        reap([p for p in descendants() if p.pid not in before], timeout=10)
        raise
    return Engine(llm)


def stop_process_tree(proc, sig=signal.SIGINT, timeout: float = 60.0) -> list[int]:
    """Signal a subprocess (a server) and make sure it and all its children are gone."""
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    return reap(tree, timeout=timeout)


def live_plans(rt) -> dict:
    """Request id -> plan of every request dcpp still holds a plan for."""
    return {s.request_id: s.plan for s in rt.requests if s.plan is not None}
