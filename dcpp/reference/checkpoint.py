"""Hugging Face Llama checkpoint directories <-> (ModelConfig, params).

A checkpoint here is a folder with ``config.json`` and ``model.safetensors`` in transformers'
Llama layout: the same tiny model is loaded by the reference, served by vLLM and compared with
transformers. ``write_random_llama`` makes one locally with transformers from a random init;
nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dcpp.reference.model import ModelConfig, Params

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a Llama ``config.json`` dict (transformers 4.x or 5.x spelling)."""
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
        raise ValueError(
            f"checkpoint is model_type={cfg.get('model_type')!r}, architectures={arch}; "
            "expected a Llama checkpoint (model_type 'llama', LlamaForCausalLM)"
        )
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"rope scaling {rope or cfg.get('rope_scaling')} is not supported; "
                         "expected default RoPE")
    num_heads = cfg["num_attention_heads"]
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config_kwargs(config: ModelConfig) -> dict:
    """Keyword arguments for ``transformers.LlamaConfig`` describing ``config``."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, Params]:
    """Load ``config.json`` + ``*.safetensors`` from a checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint folder {str(path)!r} does not exist"
                         + (" (it is a file)" if path.exists() else ""))
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"no config.json in checkpoint folder {str(path)!r}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        config = config_from_hf(raw)
    except KeyError as e:  # config_from_hf indexes the required keys
        raise ValueError(f"{cfg_file} lacks the key {e.args[0]!r} that a Llama config.json "
                         "has") from None
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in checkpoint folder {str(path)!r}")
    params: Params = {}
    for f in files:
        try:
            params.update(load_file(str(f)))
        except SafetensorError as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    if config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return config, params


def save_checkpoint(path: str | Path, config: ModelConfig, params: Params) -> Path:
    """Write ``params`` as a transformers-loadable Llama checkpoint folder."""
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(params.values())).dtype
    hf = LlamaConfig(**hf_config_kwargs(config), architectures=["LlamaForCausalLM"])
    hf.torch_dtype = dtype
    hf.save_pretrained(str(path))
    tensors = {k: v.contiguous() for k, v in params.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def write_random_llama(path: str | Path, config: ModelConfig | None = None, *, seed: int = 0,
                       initializer_range: float = 0.08,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Generate a random-init Llama with transformers and save it (no download).

    ``initializer_range`` is larger than HF's 0.02 so logits are far from uniform and greedy
    decoding/logprob comparisons are meaningful on a tiny model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or ModelConfig()
    torch.manual_seed(seed)
    hf = LlamaConfig(**hf_config_kwargs(config), initializer_range=initializer_range,
                     architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(hf).to(dtype)
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
