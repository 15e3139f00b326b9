"""The reference Llama equals transformers' LlamaForCausalLM on the same local checkpoint."""

import pytest
import torch

from dcpp.reference.checkpoint import load_checkpoint, save_checkpoint, write_random_llama
from dcpp.reference.model import ModelConfig, forward, init_params

GQA_CONFIG = ModelConfig(vocab_size=384, hidden_size=96, intermediate_size=160, num_layers=3,
                         num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", GQA_CONFIG, seed=3)


def test_forward_matches_transformers(checkpoint):
    transformers = pytest.importorskip("transformers", reason="needs transformers (dev extra)")
    config, params = load_checkpoint(checkpoint)
    assert config == GQA_CONFIG
    hf = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    tokens = torch.randint(0, config.vocab_size, (301,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
    got = forward(params, config, tokens)
    err = (got - expected).abs().max().item()
    print(f"reference vs transformers logits: max abs err {err:.2e}, "
          f"logit std {expected.std().item():.3f}")
    assert expected.std() > 0.3, "logits nearly uniform: the parity check would be weak"
    assert err < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_save_load_round_trip_is_exact(tmp_path):
    config = ModelConfig(num_layers=2, tie_word_embeddings=False)
    params = init_params(config, seed=5)
    save_checkpoint(tmp_path / "ck", config, params)
    config2, params2 = load_checkpoint(tmp_path / "ck")
    assert config2 == config
    assert params2.keys() == params.keys()
    for name, t in params.items():
        assert torch.equal(params2[name], t), name
    tokens = torch.arange(40) % config.vocab_size
    assert torch.equal(forward(params, config, tokens), forward(params2, config2, tokens))


def test_tied_embeddings_round_trip(tmp_path):
    config = ModelConfig(num_layers=1, tie_word_embeddings=True)
    params = init_params(config, seed=1)
    assert "lm_head.weight" not in params
    save_checkpoint(tmp_path / "ck", config, params)
    config2, params2 = load_checkpoint(tmp_path / "ck")
    assert config2.tie_word_embeddings and params2.keys() == params.keys()


def test_init_params_is_deterministic():
    config = ModelConfig(num_layers=1)
    a, b, c = init_params(config, 7), init_params(config, 7), init_params(config, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(num_layers=0), "num_layers=0"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("tokens, match", [
    (torch.tensor([1.0, 2.0]), "integer tensor"),
    (torch.tensor([0, 512]), "out of range"),
    (torch.tensor([], dtype=torch.int64), "empty"),
])
def test_bad_tokens(tokens, match):
    config = ModelConfig(num_layers=1)
    with pytest.raises(ValueError, match=match):
        forward(init_params(config), config, tokens)


def test_load_rejects_non_llama(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="expected a Llama checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
