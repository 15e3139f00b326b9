"""Speculative decoding: a decode step with k draft tokens schedules 1 + k tokens at the end of a
sequence; dcpp must never count it as prefill (chunk log, chunk metrics, whole-prefill timers,
the per-step cost calibration learns) nor size it (all its drafts are scheduled).

No engine: vLLM 0.32's CPU build cannot run speculative decoding with PP=2 (and dcpp needs
PP >= 2). Speculative decoding fails at start-up on PP rank 0, in the model runner's KV-cache
set-up (`vllm/v1/worker/gpu_model_runner.py`, `initialize_kv_cache_tensors`: the drafter is
only built on the last PP rank, and that line reads it on every rank):

    AttributeError: 'CPUModelRunner' object has no attribute 'drafter'

(run with ngram, k=3, PP=2; by the code any method fails there; vLLM 0.33's V1 model runner has
the same line, read, not run).
So vLLM's own scheduler classes run here with an ngram `SpeculativeConfig` and no model (as
vLLM's scheduler tests do, through `dcpp.tooling.offline`): a deterministic fake model
verifies the drafts the way vLLM's rejection sampler does (the longest correct prefix plus one
token), and a fake drafter proposes k drafts after every decode step (the ngram drafter's
place), two steps in flight as with PP=2. Greedy outputs must equal those of vLLM's own
scheduler and of dcpp's static plan.
"""

from __future__ import annotations

from dcpp.online.stage_timing import step_is_timed

import collections

import pytest

from vllm_testlib import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install dcpp[vllm])"),
]

BUDGET = 2048
MAX_LEN = 32768
K = 3  # num_speculative_tokens
MAX_TOKENS = 24
PP = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dcpp.tooling.harness import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("spec_llama"), layers=2, hidden=64,
                      max_len=MAX_LEN)


def true_next(seq):
    """The fake model's greedy next token after `seq` (deterministic, depends on all of it)."""
    return (seq[-1] * 31 + len(seq) * 7) % 499 + 1


def drafts_for(rid, seq):
    """What the fake drafter proposes after `seq`: request ids starting with "miss" get wrong
    drafts only; the others get 2 right ones, then a wrong one."""
    right, s = [], list(seq)
    for _ in range(K):
        right.append(true_next(s))
        s.append(right[-1])
    if rid.startswith("miss"):
        return [(t % 499) + 1 for t in right]  # all different from the true tokens
    return right[:2] + [(right[2] % 499) + 1] + right[3:]


def build(cls, model_dir, monkeypatch, tmp_path, executor=None, dcpp=None):
    """`cls` (vLLM's or dcpp's scheduler) with vLLM's ngram speculative config."""
    from vllm.config import SpeculativeConfig, VllmConfig

    from dcpp.tooling import offline

    real_init = VllmConfig.__init__

    def init_with_spec(self, *args, **kw):
        kw["speculative_config"] = SpeculativeConfig(
            method="ngram", num_speculative_tokens=K, prompt_lookup_max=4, prompt_lookup_min=2)
        real_init(self, *args, **kw)

    monkeypatch.setenv("DCPP_CACHE_DIR", str(tmp_path))
    with monkeypatch.context() as m:  # only while the harness builds this scheduler
        m.setattr(VllmConfig, "__init__", init_with_spec)
        sched = offline.build_scheduler(cls, model_dir, budget=BUDGET, max_model_len=MAX_LEN,
                                        pipeline_parallel_size=PP, executor=executor,
                                        dcpp=dcpp)
    assert sched.num_spec_tokens == K  # speculative decoding is on in the scheduler
    return sched


class Engine:
    """vLLM's sync PP loop (`EngineCore.step_with_batch_queue`, `PP` steps in flight) with the
    fake model and drafter; the model's answer is fixed when a step is scheduled."""

    def __init__(self, sched, executor=None):
        self.sched, self.executor = sched, executor
        self.steps: list[dict] = []  # per step: {request id: (tokens, drafts scheduled)}
        self.prefill_steps = 0  # steps that computed prompt tokens before a prompt's end
        self.timed_prefill_steps = 0  # ... of which the synthetic workers timed
        self.draft_tokens_scheduled = 0
        self.accepted = 0

    def add(self, rid, n, seed, **kw):
        from dcpp.tooling import offline

        self.sched.add_request(offline.make_request(n, max_tokens=MAX_TOKENS, request_id=rid,
                                                    seed=seed, **kw))

    def _answer(self, out):
        from vllm.v1.outputs import ModelRunnerOutput

        from dcpp.integration.vllm import vllm_compat

        sched, ids, sampled, step = self.sched, list(out.num_scheduled_tokens), [], {}
        has_prefill = False
        for rid in ids:
            req = sched.requests[rid]
            n = out.num_scheduled_tokens[rid]
            drafts = list(out.scheduled_spec_decode_tokens.get(rid, ()))
            step[rid] = (n, len(drafts))
            self.draft_tokens_scheduled += len(drafts)
            seq = list(req.all_token_ids)
            before = req.num_computed_tokens - n  # vLLM advanced it at schedule time
            # Prompt tokens computed in this step (no request is preempted here).
            has_prefill = has_prefill or (not drafts and before < req.num_prompt_tokens)
            if drafts:
                assert n == 1 + len(drafts), (rid, n, drafts)  # every draft scheduled
                got = []
                for d in drafts:
                    t = true_next(seq + got)
                    got.append(t)
                    if t != d:
                        break
                else:
                    got.append(true_next(seq + got))
                self.accepted += len(got) - 1
                sampled.append(got)
            elif req.num_computed_tokens >= req.num_tokens:
                sampled.append([true_next(seq)])
            else:
                sampled.append([])  # a prefill chunk before the prompt's end
        self.steps.append(step)
        if has_prefill:
            self.prefill_steps += 1
            if self.executor is not None and self.executor.timing_every is not None and (
                    step_is_timed(vllm_compat.step_fingerprint(out),
                                              self.executor.timing_every)):
                self.timed_prefill_steps += 1
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=sampled, logprobs=None,
                                 prompt_logprobs_dict={}, pooler_output=[])

    def _propose(self, out, answer):
        """The drafter's proposals after a step: for the requests that sampled a token in it
        (a prefill chunk before the prompt's end gets none, as with vLLM's drafters)."""
        from vllm.v1.outputs import DraftTokenIds

        ids, drafts = [], []
        for rid, sampled in zip(answer.req_ids, answer.sampled_token_ids):
            req = self.sched.requests.get(rid)
            if not sampled or req is None or req.is_finished():
                continue
            ids.append(rid)
            drafts.append(drafts_for(rid, list(req.all_token_ids)))
        if ids:
            self.sched.update_draft_token_ids(DraftTokenIds(ids, drafts))

    def run(self, max_steps=5000):
        queue: collections.deque = collections.deque()
        while self.sched.has_unfinished_requests() or queue:
            if self.sched.has_unfinished_requests():
                out = self.sched.schedule()
                if self.executor is not None:
                    self.executor.run(self.sched, out)
                queue.append((out, self._answer(out)))
                if len(queue) < PP and out.total_num_scheduled_tokens > 0:
                    continue
            out, answer = queue.popleft()
            self.sched.update_from_output(out, answer)
            self._propose(out, answer)
            assert len(self.steps) < max_steps
        return {rid: list(r) for rid, r in self.outputs.items()}

    @property
    def outputs(self):
        return self._outputs


def _track_outputs(engine):
    """Collect each request's output tokens as vLLM's scheduler reports them."""
    engine._outputs = collections.defaultdict(list)
    sched = engine.sched
    real = sched.update_from_output

    def update(out, answer):
        result = real(out, answer)
        for eco in result.values():
            for o in eco.outputs:
                engine._outputs[o.request_id].extend(o.new_token_ids)
        return result

    sched.update_from_output = update


def prompt(n, seed):
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


REQUESTS = [("long", 9000), ("miss-long", 6000), ("short", 300), ("miss-short", 40)]


def run_requests(sched, executor=None, plan=None, chunk_size=None, requests=REQUESTS):
    eng = Engine(sched, executor)
    _track_outputs(eng)
    for i, (rid, n) in enumerate(requests):
        eng.add(rid, n, i, plan=plan, chunk_size=chunk_size, arrival_time=float(i))
    return eng, eng.run()


def expected_outputs(requests=REQUESTS):
    """The fake model's greedy tokens for each request (what any correct schedule yields)."""
    want = {}
    for i, (rid, n) in enumerate(requests):
        seq = prompt(n, seed=i)
        out = []
        for _ in range(MAX_TOKENS):
            out.append(true_next(seq + out))
        want[rid] = out
    return want


def dcpp_scheduler(model_dir, monkeypatch, tmp_path, **cfg):
    from dcpp.tooling import offline
    from dcpp.integration.vllm.scheduler import DcppScheduler

    ex = offline.SyntheticExecutor()
    sched = build(DcppScheduler, model_dir, monkeypatch, tmp_path, executor=ex,
                  dcpp={"enabled": True, "min_chunk": 256, **cfg})
    rt = sched.dcpp
    assert rt is not None and rt.model is not None and rt.stage_timing
    return sched, ex


def test_vllms_scheduler_runs_the_fake_spec_decode(model_dir, monkeypatch, tmp_path):
    """The harness itself: vLLM's scheduler schedules every draft, the fake model accepts 2 of
    3 for the "long"/"short" requests and none for the "miss" ones, outputs are the model's."""
    from vllm.v1.core.sched.scheduler import Scheduler

    sched = build(Scheduler, model_dir, monkeypatch, tmp_path)
    eng, outs = run_requests(sched)
    assert outs == expected_outputs()
    assert eng.draft_tokens_scheduled > 0 and eng.accepted > 0


@pytest.mark.parametrize("plan", [None, "equal_time", "off"])
def test_draft_tokens_are_never_prefill(model_dir, monkeypatch, tmp_path, plan):
    sched, ex = dcpp_scheduler(model_dir, monkeypatch, tmp_path)
    rt = sched.dcpp
    observed, whole = [], []
    real_observe, real_request = rt.cal.observe, rt.cal.observe_request

    def observe(batch, measured, interval=None):
        observed.append(list(batch))
        return real_observe(batch, measured, interval)

    def observe_request(chunks, history, elapsed):
        whole.append((list(chunks), history))
        return real_request(chunks, history, elapsed)

    rt.cal.observe, rt.cal.observe_request = observe, observe_request
    n_chunks = []
    real_end = rt.end_step

    def end_step(step):
        before = sum(len(v) for v in rt.chunk_log.values())
        real_end(step)
        n_chunks.append(sum(len(v) for v in rt.chunk_log.values()) - before)

    rt.end_step = end_step
    eng, outs = run_requests(sched, ex, plan=plan)

    # Greedy outputs are the model's (the same as vLLM's scheduler and the static plan).
    assert outs == expected_outputs()
    assert eng.draft_tokens_scheduled > 0 and eng.accepted > 0
    decode_steps = [s for s in eng.steps if any(d for _, d in s.values())]
    assert len(decode_steps) > 10
    # Every draft was scheduled (dcpp never sizes a decode: 1 + K tokens each time).
    for step in decode_steps:
        for rid, (n, d) in step.items():
            if d:
                assert n == 1 + d == 1 + K, step
    # Chunk log: each request's prefill chunks, summing to its prompt, no decode in it.
    lengths = dict(REQUESTS)
    for rid, n in lengths.items():
        hits = [v for k, v in rt.chunk_log.items() if k == rid]
        assert len(hits) == 1, (rid, list(rt.chunk_log))
        assert sum(hits[0]) == n, (rid, hits[0])
    # A pure decode step (drafts only) adds nothing to the chunk log.
    for step, added in zip(eng.steps, n_chunks):
        if all(d for _, d in step.values()):
            assert added == 0, step
    # No prefill timer or plan left behind; whole prefills are the prompts' chunks only.
    assert not rt.prefills.timed() and not any(s.plan for s in rt.requests)
    for chunks, history in whole:
        assert history == 0 and sum(chunks) in lengths.values(), (chunks, history)
    # Calibration saw the timed steps with a prefill and no step of decodes only.
    assert observed, "calibration got no step timings"
    assert len(observed) == eng.timed_prefill_steps, (len(observed), eng.timed_prefill_steps)
    for batch in observed:
        assert any(n != 1 + K for n, _ in batch), batch


def test_metrics_count_prefill_chunks_only(model_dir, monkeypatch, tmp_path):
    pytest.importorskip("prometheus_client")
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sched, ex = dcpp_scheduler(model_dir, monkeypatch, tmp_path, metrics_port=port)
    rt = sched.dcpp
    try:
        eng, outs = run_requests(sched, ex)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        rt.close()
    assert outs == expected_outputs()
    values = {line.split(" ")[0]: float(line.split(" ")[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    chunks = [c for rid, _ in REQUESTS for c in rt.chunk_log[rid]]
    assert values["dcpp_prefill_chunk_tokens_count"] == len(chunks)
    assert values["dcpp_prefill_chunk_tokens_sum"] == sum(n for _, n in REQUESTS)
    assert values["dcpp_step_overhead_seconds"] == pytest.approx(rt.cal.overhead_s())


def test_fixed_chunk_size_keeps_every_draft(model_dir, monkeypatch, tmp_path):
    """`dcpp_chunk_size` below 1 + K: prefill chunks follow it, decodes keep all K drafts."""
    sched, ex = dcpp_scheduler(model_dir, monkeypatch, tmp_path)
    rt = sched.dcpp
    short = [("short", 300), ("miss-short", 40)]
    eng, outs = run_requests(sched, ex, chunk_size=2, requests=short)
    assert outs == expected_outputs(short)
    assert rt.chunk_log["short"] == [2] * 150
    for step in eng.steps:
        for rid, (n, d) in step.items():
            if d:
                assert n == 1 + K, (rid, step)
