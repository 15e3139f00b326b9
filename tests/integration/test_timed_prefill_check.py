"""Worker side of start-up profiling: a model runner that cannot time one prefill after a
history is reported in the RPC's result (`unsupported`), never timed. Checked against vLLM
0.32's own runner classes (V1: honours `force_attention`/`profile_seq_lens`; V2, the CUDA
default: swallows them in **kwargs) and fake runners (no engine)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from dcpp.integration.vllm import vllm_compat_worker
from dcpp.integration.vllm.worker_extension import stage_timed_prefill


class V1Like:
    """A runner as vLLM's V1 `_dummy_run` behaves: max_num_seqs read per call, one request of
    `num_tokens` at `profile_seq_lens` when max_num_seqs is 1 (the buffers show it)."""

    def __init__(self, honours_max_num_seqs=True, buffers=True):
        self.scheduler_config = NS(max_num_seqs=256)
        self.max_num_reqs = 256
        self.honours = honours_max_num_seqs
        self.calls = []
        if buffers:
            self.query_start_loc = NS(np=np.zeros(257, dtype=np.int32))
            self.optimistic_seq_lens_cpu = np.zeros(256, dtype=np.int32)

    def _dummy_run(self, num_tokens, cudagraph_runtime_mode=None, force_attention=False,
                   uniform_decode=False, profile_seq_lens=None):
        self.calls.append((num_tokens, force_attention, profile_seq_lens,
                           self.scheduler_config.max_num_seqs))
        limit = self.scheduler_config.max_num_seqs if self.honours else self.max_num_reqs
        num_reqs = min(num_tokens, limit)
        per = [num_tokens // num_reqs] * num_reqs
        per[-1] += num_tokens % num_reqs
        if hasattr(self, "query_start_loc"):
            self.query_start_loc.np[1:num_reqs + 1] = np.cumsum(per)
            self.optimistic_seq_lens_cpu[:num_reqs] = profile_seq_lens or max(per)


class V2Like:
    """vLLM 0.32's V2 `_dummy_run` signature (vllm/v1/worker/gpu/model_runner.py)."""

    def __init__(self):
        self.scheduler_config = NS(max_num_seqs=256)
        self.calls = 0

    def _dummy_run(self, num_tokens, *args, skip_attn=False, uniform_decode=False,
                   context_len=0, skip_eplb=False, is_profile=False,
                   valid_dummy_state_slots=False, randomize_inputs=False, **kwargs):
        self.calls += 1


def worker(runner):
    return NS(model_runner=runner)


def test_v1_runner_is_timed_and_max_num_seqs_restored():
    runner = V1Like()
    res = stage_timed_prefill(worker(runner), 512, 1024, repeats=2)
    assert "unsupported" not in res and res["seconds"] >= 0
    assert runner.calls == [(512, True, 1536, 1)] * 2
    assert runner.scheduler_config.max_num_seqs == 256


def test_v2_runner_is_reported_unsupported_without_running():
    runner = V2Like()
    res = stage_timed_prefill(worker(runner), 512, 1024)
    assert res["seconds"] is None and runner.calls == 0
    reason = res["unsupported"]
    assert "force_attention and profile_seq_lens" in reason and "**kwargs" in reason
    assert "V2 model runner" in reason


def test_runner_that_splits_the_dummy_run_is_caught_after_the_first_pass():
    """A runner with the right signature that still splits the tokens (max_num_seqs read at
    init, as V2 does): the buffers after the first pass show it, and nothing is reported as a
    time."""
    runner = V1Like(honours_max_num_seqs=False)
    res = stage_timed_prefill(worker(runner), 512, 1024, repeats=3)
    assert res["seconds"] is None and len(runner.calls) == 1
    assert "ran a first request of 2 tokens" in res["unsupported"]
    assert runner.scheduler_config.max_num_seqs == 256


def test_runner_without_readable_buffers_is_trusted_on_its_signature():
    res = stage_timed_prefill(worker(V1Like(buffers=False)), 256, 0)
    assert "unsupported" not in res and res["seconds"] >= 0


def test_runner_without_dummy_run_or_max_num_seqs():
    assert "has no _dummy_run" in vllm_compat_worker.timed_prefill_unsupported(worker(object()))
    runner = V1Like()
    runner.scheduler_config = NS()
    assert "max_num_seqs" in vllm_compat_worker.timed_prefill_unsupported(worker(runner))


@pytest.mark.vllm
def test_vllm_032_runner_classes():
    """The installed vLLM's runners: V1 (GPU, and the CPU build's subclass) pass; V2 (GPU, the
    CUDA default, and its CPU subclass) are reported, naming the swallowed arguments."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CpuV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CpuV1
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GpuV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as GpuV1

    def runner(cls):
        r = object.__new__(cls)  # no __init__: only the method's signature is read
        r.scheduler_config = NS(max_num_seqs=256)
        return r

    for cls in (GpuV1, CpuV1):
        assert vllm_compat_worker.timed_prefill_unsupported(worker(runner(cls))) is None, cls
    for cls in (GpuV2, CpuV2):
        reason = vllm_compat_worker.timed_prefill_unsupported(worker(runner(cls)))
        assert reason and "**kwargs" in reason and cls.__module__ in reason, (cls, reason)
