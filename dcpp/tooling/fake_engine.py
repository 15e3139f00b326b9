"""Stand-ins for a vLLM engine around dcpp's runtime, for tests that start no engine: one fake
model executor (profiling passes and per-stage step timing), stand-in configs, requests and
schedulers, and `Driven`, a runtime driven through the same `SchedulerAdapter` the scheduler
mixin uses; `dcpp_log`, dcpp's log records in pytest's `caplog`. Imports no vLLM module.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from types import SimpleNamespace as NS
from typing import Any, Callable, Iterator

from dcpp.integration.vllm.adapter import SchedulerAdapter, build_runtime
from dcpp.integration.vllm import vllm_compat

BUDGET = 1024
MAX_LEN = 16384


def true_time(chunk: int, history: int) -> float:
    """A synthetic stage: 2 ms per step, attention grows with history."""
    return 2e-3 + 2e-6 * chunk + 4e-9 * chunk * history + 2e-9 * chunk * chunk


def done_future(value: Any) -> concurrent.futures.Future:
    """A future that is already done (what a worker RPC returns with non_block=True)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future


class FakeExecutor:
    """A model executor's `collective_rpc` for dcpp's worker RPCs on `num_stages` PP ranks.

    Profiling passes (`calls` counts them) time `fn(chunk, history)` on every stage, scaled by
    `stage_scale[rank]` (default: stage r is 10% slower than stage r-1); `error`, when set, is
    raised from them instead (a worker's error, a timeout), and `reply(chunk, history)`, when
    set, is returned as the workers' answer. Step timing (`step_timing`; without it enabling
    fails as with workers that cannot time): `queued` holds the records the next drain returns,
    (fingerprint, seconds per rank) or (fingerprint, seconds per rank, start per rank);
    `future(value, executor)` makes a non-blocking drain's future (default: one already done).
    Any other RPC is a test's mistake (AssertionError, which no RPC handler catches)."""

    def __init__(self, fn: Callable[[int, int], float] = true_time,
                 error: BaseException | None = None,
                 reply: Callable[[int, int], list] | None = None, step_timing: bool = False,
                 num_stages: int = 2, stage_scale: tuple[float, ...] | None = None,
                 future: Callable[[Any, Any], Any] | None = None) -> None:
        self.fn, self.error, self.reply, self.calls = fn, error, reply, 0
        self.step_timing, self.queued = step_timing, []
        self.num_stages = num_stages
        self.stage_scale = stage_scale or tuple(1.0 + 0.1 * r for r in range(num_stages))
        self.future = future or (lambda value, executor: done_future(value))
        self.repeats: list[int] = []  # runs per profiling pass (best of), per call
        self.every = 1  # the workers' timing rate, as the scheduler's RPCs set it
        self.drains = 0
        self.synced = 0  # steps the workers timed (and synchronised on), counted by tests

    def record(self, fingerprint: int, starts: Any, ends: Any) -> None:
        """The workers' timers recorded step `fingerprint` on each stage from starts[r] to
        ends[r] (s)."""
        self.queued.append((fingerprint, [e - s for s, e in zip(starts, ends)], list(starts)))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        name = method if isinstance(method, str) else method.__name__
        ranks = range(self.num_stages)
        if name.endswith("enable_step_timing"):
            if not self.step_timing:
                raise RuntimeError("no step timing in this fake")
            self.every = int(args[0]) if args else 1
            return [{"pp_rank": r, "tp_rank": 0, "ok": True} for r in ranks]
        if name.endswith("drain_step_times"):
            self.drains += 1
            out = [{"pp_rank": r, "tp_rank": 0,
                    "times": [(q[0], q[1][r]) + ((q[2][r],) if len(q) > 2 else ())
                              for q in self.queued]} for r in ranks]
            self.queued = []
            if args and args[0] is not None:  # the new timing rate rides on the drain
                self.every = int(args[0])
            return self.future(out, self) if non_block else out
        if not name.endswith("timed_prefill"):
            raise AssertionError(f"FakeExecutor has no RPC {name!r}")
        self.calls += 1
        if self.error is not None:
            raise self.error
        n, h = int(args[0]), int(args[1])
        self.repeats.append(args[2])
        if self.reply is not None:
            return self.reply(n, h)
        return [{"pp_rank": r, "tp_rank": 0, "seconds": self.fn(n, h) * self.stage_scale[r]}
                for r in ranks]


def fake_vllm_config(need_timing: bool = True, min_chunk: int = 64, metrics_port: int = 0,
                     extra: dict | None = None, budget: int = BUDGET,
                     max_len: int = MAX_LEN) -> NS:
    """The parts of a `VllmConfig` dcpp reads (PP=2, chunked prefill, dcpp enabled; vLLM's
    default scheduler, which the plugin's config hook replaces; `extra` overrides the block's
    keys, e.g. ``{"enabled": False}``)."""
    return NS(
        scheduler_config=NS(max_num_batched_tokens=budget, enable_chunked_prefill=True,
                            scheduler_cls=None, async_scheduling=False),
        model_config=NS(max_model_len=max_len, model="fake-model", dtype="float32",
                        enforce_eager=False),
        cache_config=NS(block_size=16),
        parallel_config=NS(pipeline_parallel_size=2, tensor_parallel_size=1,
                           worker_extension_cls=""),
        additional_config={"profiling_chunk_config": {
            "enabled": True, "min_chunk": min_chunk, "need_timing": need_timing,
            "metrics_port": metrics_port, **(extra or {})}},
    )


def req(rid: str, n: int, computed: int = 0, extra: dict | None = None) -> NS:
    """A stand-in vLLM request of `n` tokens, `computed` of them done."""
    return NS(request_id=rid, num_tokens=n, num_prompt_tokens=n, num_computed_tokens=computed,
              num_tokens_with_spec=n,
              sampling_params=NS(extra_args=extra) if extra is not None else None)


SCHED = NS(scheduler_config=NS(disable_chunked_mm_input=False))
"""The scheduler `offer` reads its mm / Mamba settings from (neither applies here)."""


def sched(running=(), budget: int = BUDGET, requests: dict | None = None) -> NS:
    """A stand-in vLLM scheduler: running requests, step budget, live requests (and `SCHED`'s
    settings, so that it also answers `offer`)."""
    return NS(running=list(running), waiting=[], max_num_scheduled_tokens=budget,
              requests=dict(requests or {}), scheduler_config=SCHED.scheduler_config)


class Driven:
    """A `DcppRuntime` driven as vLLM's scheduler drives it, through `SchedulerAdapter`, with
    stand-in scheduler objects; vLLM takes every number dcpp answers (`cap` commits it)."""

    def __init__(self, runtime: Any) -> None:
        self.rt = runtime
        self.events = SchedulerAdapter(runtime)

    def __getattr__(self, name: str) -> Any:  # the runtime's own attributes
        return getattr(self.rt, name)

    def begin_step(self, scheduler: Any) -> None:
        self.events.begin_step(scheduler)

    def cap(self, scheduler: Any, request: Any, history: int, offered: int,
            commit: bool = True) -> int:
        got = self.events.size(scheduler, request, history, offered)
        if commit:
            self.events.commit(request, history, got)
        return got

    def end_step(self, scheduler: Any, out: Any) -> None:
        self.events.end_step(scheduler, out)

    def on_output(self, out: Any, t_out: float, idle: bool = False) -> None:
        self.events.on_output(out, t_out, idle)

    def free(self, request_ids: Any) -> None:
        self.rt.free(request_ids)


def driven_runtime(executor: Any | None = None, **config: Any) -> Driven:
    """`build_runtime` on `fake_vllm_config(**config)` with `executor` (default: a
    `FakeExecutor`), driven as vLLM would. Set DCPP_CACHE_DIR first (profiles are cached)."""
    vc = fake_vllm_config(**config)
    rt = build_runtime(vc, executor=executor if executor is not None else FakeExecutor())
    assert rt is not None, "dcpp is enabled in fake_vllm_config"
    return Driven(rt)


def fingerprint(out: Any) -> int:
    return vllm_compat.step_fingerprint(out)


@contextlib.contextmanager
def dcpp_log(caplog: Any, level: int = logging.WARNING) -> Iterator[Any]:
    """dcpp's records ("vllm.dcpp", from `level`) in pytest's `caplog`, each once, also where
    vLLM has stopped its "vllm" logger propagating to the root."""
    log = logging.getLogger("vllm.dcpp")
    propagate, log.propagate = log.propagate, False
    log.addHandler(caplog.handler)
    caplog.set_level(level, logger="vllm.dcpp")
    try:
        yield caplog
    finally:
        log.removeHandler(caplog.handler)
        log.propagate = propagate


def isolated_runtime(monkeypatch: Any, cache_dir: Any, executor: Any | None = None,
                     **config: Any) -> Driven:
    """`driven_runtime` with its profile cache in `cache_dir` and dcpp's default timing rate
    (pytest's `monkeypatch` sets and restores the environment)."""
    monkeypatch.setenv("DCPP_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("DCPP_BUBBLE_SAMPLE_EVERY", raising=False)
    return driven_runtime(executor, **config)
