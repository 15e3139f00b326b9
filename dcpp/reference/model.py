"""A tiny Llama-style decoder as pure functions over a params dict.

Parameter names and layouts are Hugging Face Llama's (``model.layers.{i}.self_attn.q_proj.weight``
is ``[num_heads * head_dim, hidden_size]``, etc.), so a checkpoint written by transformers loads
as-is (see ``checkpoint.py``). ``forward`` is the monolithic, cache-free ground truth; the paged
per-layer path (``layer_forward_paged``) is what the pipeline runs chunk by chunk.
Math in fp32 for norms, softmax and RoPE; weights may be any float dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dcpp.reference.attention import chunked_prefill_attention
from dcpp.reference.kv_cache import write_kv, write_kv_inplace

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder."""

    vocab_size: int = 512
    """Number of token ids."""
    hidden_size: int = 128
    """Residual stream width."""
    intermediate_size: int = 256
    """SwiGLU MLP inner width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (GQA); num_heads must be a multiple."""
    head_dim: int = 32
    """Per-head width."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    max_position_embeddings: int = 65536
    """Longest sequence the model accepts."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"ModelConfig.{f.name}={v!r}; expected a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def init_params(config: ModelConfig, seed: int = 0, *, std: float = 0.08,
                dtype: torch.dtype = torch.float32) -> Params:
    """Random weights (normal, ``std``), norms at 1. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    p: Params = {"model.embed_tokens.weight": w(c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        pre = layer_prefix(i)
        p[pre + "input_layernorm.weight"] = torch.ones(c.hidden_size, dtype=dtype)
        p[pre + "self_attn.q_proj.weight"] = w(q_out, c.hidden_size)
        p[pre + "self_attn.k_proj.weight"] = w(kv_out, c.hidden_size)
        p[pre + "self_attn.v_proj.weight"] = w(kv_out, c.hidden_size)
        p[pre + "self_attn.o_proj.weight"] = w(c.hidden_size, q_out)
        p[pre + "post_attention_layernorm.weight"] = torch.ones(c.hidden_size, dtype=dtype)
        p[pre + "mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        p[pre + "mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        p[pre + "mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size)
    p["model.norm.weight"] = torch.ones(c.hidden_size, dtype=dtype)
    if not c.tie_word_embeddings:
        p["lm_head.weight"] = w(c.vocab_size, c.hidden_size)
    return p


# ---------------------------------------------------------------- building blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, hidden] -> [T, hidden] (x.dtype); normalises in fp32 like HF."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, half-split (HF ``rotate_half``) convention.

    x: [T, heads, head_dim]; positions: [T] int -> [T, heads, head_dim] (x.dtype).
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # [T, 1, head_dim]
    xf = x.float()
    x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [T, in]; weight: [out, in] (HF layout) -> [T, out]."""
    return x @ weight.t()


def mlp(params: Params, pre: str, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU. x: [T, hidden] -> [T, hidden]."""
    gate = linear(x, params[pre + "mlp.gate_proj.weight"])
    up = linear(x, params[pre + "mlp.up_proj.weight"])
    return linear(torch.nn.functional.silu(gate) * up, params[pre + "mlp.down_proj.weight"])


def qkv(params: Params, config: ModelConfig, pre: str, x: torch.Tensor,
        positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [T, hidden] -> q [T, num_heads, d], k and v [T, num_kv_heads, d]; RoPE applied."""
    c = config
    h = rms_norm(x, params[pre + "input_layernorm.weight"], c.rms_norm_eps)
    q = linear(h, params[pre + "self_attn.q_proj.weight"]).view(-1, c.num_heads, c.head_dim)
    k = linear(h, params[pre + "self_attn.k_proj.weight"]).view(-1, c.num_kv_heads, c.head_dim)
    v = linear(h, params[pre + "self_attn.v_proj.weight"]).view(-1, c.num_kv_heads, c.head_dim)
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v


def finish_layer(params: Params, config: ModelConfig, pre: str, x: torch.Tensor,
                 attn: torch.Tensor) -> torch.Tensor:
    """Output projection, residuals and MLP. x: [T, hidden]; attn: [T, num_heads, d]."""
    x = x + linear(attn.reshape(x.shape[0], -1), params[pre + "self_attn.o_proj.weight"])
    h = rms_norm(x, params[pre + "post_attention_layernorm.weight"], config.rms_norm_eps)
    return x + mlp(params, pre, h)


def embed(params: Params, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: [T] int -> hidden [T, hidden]."""
    return params["model.embed_tokens.weight"][tokens]


def lm_head(params: Params, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """x: [T, hidden] -> logits [T, vocab] in fp32."""
    h = rms_norm(x, params["model.norm.weight"], config.rms_norm_eps)
    w = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return linear(h, w).float()


# ---------------------------------------------------------------- monolithic ground truth


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention, no cache. q: [T, H, d]; k, v: [T, KV, d] -> [T, H, d]."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(q.shape[-1])
    t = q.shape[0]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def check_tokens(config: ModelConfig, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be a 1-D integer tensor [T], got {tokens!r:.80}")
    if tokens.numel() == 0:
        raise ValueError("tokens is empty; expected at least one token id")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids {lo}..{hi} out of range [0, vocab_size={config.vocab_size})")
    if tokens.numel() > config.max_position_embeddings:
        raise ValueError(
            f"{tokens.numel()} tokens exceed max_position_embeddings="
            f"{config.max_position_embeddings}"
        )


def forward(params: Params, config: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Whole prompt at once, no KV cache. tokens: [T] int -> logits [T, vocab] fp32."""
    check_tokens(config, tokens)
    positions = torch.arange(tokens.numel(), device=tokens.device)
    x = embed(params, tokens)
    for i in range(config.num_layers):
        pre = layer_prefix(i)
        q, k, v = qkv(params, config, pre, x, positions)
        x = finish_layer(params, config, pre, x, dense_causal_attention(q, k, v))
    return lm_head(params, config, x)


# ---------------------------------------------------------------- paged path (one layer)


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step batch layout, built once and shared by every layer and stage (plan/run split)."""

    positions: torch.Tensor  # [num_tokens] int64, absolute position of each query token
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each query token
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context_len + query_len


def layer_forward_paged(
    params: Params,
    config: ModelConfig,
    layer: int,
    x: torch.Tensor,  # [num_tokens, hidden]
    kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [num_blocks, block_size, kv_heads, d]
    meta: AttentionMetadata,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One decoder layer over a chunk: write its K/V into the paged cache, attend, MLP.

    Returns the new hidden states [num_tokens, hidden] and the new (key_cache, value_cache);
    with ``inplace`` the given caches are written and returned (for timing, as an engine).
    """
    pre = layer_prefix(layer)
    q, k, v = qkv(params, config, pre, x, meta.positions)
    if inplace:
        write_kv_inplace(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        key_cache, value_cache = kv_cache
    else:
        key_cache, value_cache = write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
    attn = chunked_prefill_attention(
        q, key_cache, value_cache, meta.block_table, meta.query_start_loc, meta.seq_lens
    )
    return finish_layer(params, config, pre, x, attn), (key_cache, value_cache)
