"""The word-level tokenizer for the tiny checkpoint (`harness.word_tokenizer`), which lets
vLLM's own client (`vllm bench serve --dataset-name random`) run against the dcpp server: ids
round-trip exactly through text, no special token is added, and vLLM's random dataset builds
prompts of exactly the lengths it asks for. No server; `test_serve_load_quick.py` runs the
client against a real one (workload vllm-random)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dcpp.tooling import harness, load_client
from vllm_testlib import vllm_available

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = harness.tiny_llama(tmp_path_factory.mktemp("tok") / "model", layers=1, hidden=64,
                              max_len=256)
    return harness.word_tokenizer(path)


def test_ids_round_trip_through_text(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert tok.vocab_size == len(tok) == vocab
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.num_special_tokens_to_add() == 0
    every = list(range(3, vocab))
    text = tok.decode(every)
    assert text.split() == [f"w{i}" for i in every]
    assert tok.encode(text) == every  # add_special_tokens=True adds nothing either
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000):
        ids = rng.integers(3, vocab, size=n).tolist()
        assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    assert tok.encode("w3  w4\nw5") == [3, 4, 5]
    assert tok.encode("hello") == [0]  # unknown word


def test_written_once_and_checked(model, tmp_path):
    before = (model / "tokenizer.json").stat().st_mtime_ns
    assert harness.word_tokenizer(model) == model
    assert (model / "tokenizer.json").stat().st_mtime_ns == before
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 64, "eos_token_id": 5}))
    with pytest.raises(ValueError, match="eos_token_id"):
        harness.word_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        harness.word_tokenizer(tmp_path / "missing")


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="needs vllm")
def test_vllm_random_dataset_gets_exact_lengths(model):
    from vllm.benchmarks.datasets.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(str(model))

    def sample(seed):
        return RandomDataset(random_seed=seed).sample(
            tok, num_requests=6, input_len=120, output_len=4,
            range_ratio={"input": 0.9, "output": 0.0})

    reqs = sample(3)
    for r in reqs:
        ids = tok.encode(r.prompt, add_special_tokens=False)
        assert len(ids) == r.prompt_len and r.expected_output_len == 4
        assert all(3 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == r.prompt
    assert len({r.prompt_len for r in reqs}) > 1  # the range ratio varies the lengths
    assert [r.prompt for r in sample(3)] == [r.prompt for r in reqs]  # same seed, same prompts


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="needs vllm")
def test_bench_serve_command_parses_with_vllms_own_parser(tmp_path):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cmd = load_client.bench_serve_command(
        "http://127.0.0.1:1", "m", input_len=100, output_len=4, input_range_ratio=0.9,
        num_prompts=2, concurrency=2, seed=1, result_dir=tmp_path, result_filename="r.json",
        extra_body={"vllm_xargs": {"dcpp_plan": "off"}, "cache_salt": "x"})
    assert cmd[1:6] == ["-m", "dcpp.integration.vllm.launch", "bench", "serve", "--backend"]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(cmd[5:])
    assert args.extra_body == {"vllm_xargs": {"dcpp_plan": "off"}, "cache_salt": "x"}
    assert args.dataset_name == "random" and args.ignore_eos and args.temperature == 0
    assert args.save_detailed and args.ready_check_timeout_sec == 0
    assert json.loads(args.random_range_ratio) == {"input": 0.9, "output": 0.0}
