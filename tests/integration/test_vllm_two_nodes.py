"""Two nodes on loopback: vLLM's multiprocessing multi-node pipeline parallelism (no Ray) with
dcpp enabled, on the CPU build.

Node 1 is vLLM's headless worker node (``vllm serve ... --nnodes 2 --node-rank 1 --headless``,
started through `dcpp.integration.vllm.launch`: the CPU build's ``vllm`` console script cannot
start), PP rank 1, bound to core 1. Node 0 is an in-process engine (``--node-rank 0``), PP rank
0, bound to core 0, so the test reads dcpp's scheduler state: start-up profiling must time the
remote stage, per-stage step timings must come back from both stages, greedy tokens must equal
vLLM's own chunking ("off" per request), and no process of either node may survive.
"""

from __future__ import annotations

import os

import pytest

import vllm_testlib as lib

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not lib.vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
    pytest.mark.timeout(900),  # a node that never joins would otherwise hang node 0's start
]

PROMPT_LEN = 3000
DCPP = {"enabled": True, "min_chunk": lib.MIN_CHUNK, "num_profile_samples": 16}


@pytest.fixture(scope="module")
def two_nodes(tiny_checkpoint, tmp_path_factory):
    import json

    from dcpp.tooling import harness

    log_dir = tmp_path_factory.mktemp("two_nodes")
    master_port = harness.free_port()
    # Each node: the same model and engine flags (and dcpp block: its workers need dcpp's
    # worker extension); one core each.
    flags = ["--pipeline-parallel-size", "2", "--enable-chunked-prefill",
             "--skip-tokenizer-init", "--dtype", "float32",
             "--max-num-batched-tokens", str(lib.BUDGET),
             "--max-model-len", str(lib.MAX_MODEL_LEN), "--seed", "0",
             "--additional-config", json.dumps({"profiling_chunk_config": DCPP})]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    node1_log = log_dir / "node1.log"
    node1 = harness.start_headless_node(tiny_checkpoint, master_port=master_port, flags=flags,
                                        env=env, log_path=node1_log)
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "DCPP_CACHE_DIR")}
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # node 0 holds PP rank 0 only
    # A profile cache of its own: the other engine tests' profile has the same key, and this
    # one must profile (over both nodes).
    os.environ["DCPP_CACHE_DIR"] = str(log_dir / "profiles")
    # What start-up profiling's RPCs brought back from the workers (node 0's executor lives in
    # this process; vLLM reconfigures logging at start-up, so its debug lines are not read).
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    profile_results: list[list] = []
    real_rpc = MultiprocExecutor.collective_rpc

    def recording_rpc(self, method, *args, **kwargs):
        out = real_rpc(self, method, *args, **kwargs)
        if method == "dcpp_timed_prefill" or getattr(method, "__name__", "") == (
                "stage_timed_prefill"):
            profile_results.append(list(out))
        return out

    eng = None
    try:
        try:
            with pytest.MonkeyPatch.context() as m:
                m.setattr(MultiprocExecutor, "collective_rpc", recording_rpc)
                eng = lib.make_engine(tiny_checkpoint, nnodes=2, node_rank=0,
                                      master_addr="127.0.0.1", master_port=master_port,
                                      additional_config={"profiling_chunk_config": DCPP})
        except BaseException:
            raise RuntimeError("node 0 did not start; node 1's log:\n"
                               + node1_log.read_text()[-4000:]) from None
        node1_pids = {p.pid for p in harness.node_processes(node1)}
        node0_procs = [p for p in lib.descendants() if p.pid not in node1_pids]
        yield {"engine": eng, "node1": node1, "node1_log": node1_log, "node1_pids": node1_pids,
               "node0_procs": node0_procs, "profile_results": profile_results}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if eng is not None and eng.llm is not None:
            # Node 0's processes only: node 1's are left to `stop_node`.
            eng.shutdown([p for p in lib.descendants()
                          if p.pid not in {q.pid for q in harness.node_processes(node1)}])
        harness.stop_node(node1, timeout=30)


def generate(eng, tokens, plan=None, max_tokens=8):
    from vllm import SamplingParams

    assert eng.llm.reset_prefix_cache()  # compute the prompt again
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True, extra_args={"dcpp_plan": plan} if plan else None)
    return eng.llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]


def chunks(rt, request_id):
    hits = [v for k, v in rt.chunk_log.items()
            if k == request_id or k.rsplit("-", 1)[0] == request_id]
    assert len(hits) == 1, (request_id, list(rt.chunk_log)[-4:])
    return list(hits[0])


def test_each_stage_runs_on_its_own_node(two_nodes):
    """PP rank 0's worker is node 0's child; PP rank 1's lives in the headless node."""
    from dcpp.integration.vllm import vllm_compat_worker

    eng = two_nodes["engine"]
    ex = eng.core.model_executor
    assert type(ex).__name__ == "MultiprocExecutor"
    got = ex.collective_rpc(lambda worker: {"pid": os.getpid(),
                                            **vllm_compat_worker.worker_stage(worker)})
    by_rank = {r["pp_rank"]: r["pid"] for r in got}
    assert sorted(by_rank) == [0, 1], got
    assert by_rank[0] in {p.pid for p in two_nodes["node0_procs"]}, got
    assert by_rank[1] in two_nodes["node1_pids"], (got, two_nodes["node1_pids"])


def test_startup_profiling_timed_both_stages(two_nodes):
    rt = two_nodes["engine"].scheduler.dcpp
    assert rt is not None and rt.model is not None, "profiling fell back to static chunking"
    assert rt.profile.source == "profiled" and rt.profile.passes > 0
    passes = two_nodes["profile_results"]
    assert len(passes) == rt.profile.passes
    for results in passes:  # one answer per worker: the remote stage timed every pass
        assert sorted(int(r["pp_rank"]) for r in results) == [0, 1], results
        assert all(float(r["seconds"]) > 0 for r in results), results


def test_greedy_equal_to_static_and_stage_times_from_both_nodes(two_nodes):
    eng = two_nodes["engine"]
    rt = eng.scheduler.dcpp
    assert rt.stage_timing, "per-stage step timing is off"
    drained: list[list] = []
    real_match = rt.timing._match

    def match(results, steps, sink):  # what each drain RPC brought back, per worker
        drained.append(list(results))
        return real_match(results, steps, sink)

    rt.timing._match = match
    try:
        p = lib_prompt(PROMPT_LEN)
        observed = rt.cal.num_observations
        static = generate(eng, p, plan="off")
        dynamic = generate(eng, p)
    finally:
        del rt.timing._match
    assert list(dynamic.outputs[0].token_ids) == list(static.outputs[0].token_ids)
    assert len(static.outputs[0].token_ids) == 8
    static_chunks = chunks(rt, static.request_id)
    assert static_chunks == [lib.BUDGET] * (PROMPT_LEN // lib.BUDGET) + [PROMPT_LEN % lib.BUDGET]
    dyn = chunks(rt, dynamic.request_id)
    [(start, planned)] = [v for k, v in rt.plan_log.items()
                          if k.rsplit("-", 1)[0] == dynamic.request_id][0]
    assert start == 0 and dyn == planned and sum(dyn) == PROMPT_LEN
    # Step times came back from both stages (PP rank 1 from the other node) and reached
    # calibration.
    assert drained, "no drain RPC was read"
    ranks_with_times = {int(r["pp_rank"]) for res in drained for r in res if r.get("times")}
    assert ranks_with_times == {0, 1}, drained[-1:]
    assert rt.cal.num_observations > observed


def lib_prompt(n, seed=1):
    import torch

    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_no_process_left_after_shutdown(two_nodes):
    """Node 0's engine shuts down (its worker exits), then node 1 on SIGINT, as vLLM's serve
    does; nothing of either node is left running."""
    from dcpp.tooling import harness

    eng, node1 = two_nodes["engine"], two_nodes["node1"]
    node0_procs = [p for p in lib.descendants() if p.pid not in two_nodes["node1_pids"]]
    killed0 = eng.shutdown(node0_procs)  # node 1's are left to `stop_node`
    killed1 = harness.stop_node(node1, timeout=60)
    assert node1.poll() is not None, "node 1 still running"
    left = [p.pid for p in node0_procs if lib._alive(p)]
    left += [p.pid for p in harness.node_processes(node1)]
    assert not left, f"processes survived: {left}"
    assert not killed0, f"node 0's processes had to be killed: {killed0}"
    assert not killed1, (f"node 1's processes had to be killed after SIGINT: {killed1}\n"
                         + two_nodes["node1_log"].read_text()[-3000:])
