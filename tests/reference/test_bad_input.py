"""Bad input to the public reference functions raises ValueError naming the argument, the given
value and what is expected (DESIGN.md §5.2)."""

from __future__ import annotations

import pytest
import torch

from dcpp.reference.attention import chunked_prefill_attention
from dcpp.reference.kv_cache import write_kv

# Valid baseline: 2 sequences (a 3-token chunk after 2 cached tokens, and a 1-token decode after
# 4), block_size 4, 8 blocks, 4 query heads over 2 KV heads, head_dim 8.
NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 4, 4, 2, 8


def attention_args() -> dict:
    g = torch.Generator().manual_seed(0)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return dict(
        query=torch.randn(4, NUM_HEADS, HEAD_DIM, generator=g),  # [num_tokens, heads, d]
        key_cache=torch.randn(cache_shape, generator=g),
        value_cache=torch.randn(cache_shape, generator=g),
        block_table=torch.tensor([[3, 1], [6, 0]], dtype=torch.int32),  # [num_seqs, 2]
        query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),  # [num_seqs + 1]
        seq_lens=torch.tensor([5, 5], dtype=torch.int32),  # [num_seqs]
    )


def write_kv_args() -> dict:
    g = torch.Generator().manual_seed(1)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return dict(
        key=torch.randn(3, NUM_KV_HEADS, HEAD_DIM, generator=g),  # [num_tokens, kv_heads, d]
        value=torch.randn(3, NUM_KV_HEADS, HEAD_DIM, generator=g),
        key_cache=torch.zeros(cache_shape),
        value_cache=torch.zeros(cache_shape),
        slot_mapping=torch.tensor([0, 13, -1]),  # [num_tokens]
    )


def test_baselines_are_valid():
    out = chunked_prefill_attention(**attention_args())
    assert out.shape == (4, NUM_HEADS, HEAD_DIM)
    k, v = write_kv(**write_kv_args())
    assert k.shape == (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


# (case id, argument overrides, regex the message must match)
ATTENTION_CASES = [
    ("query_not_tensor", dict(query=[[1.0]]), r"query must be a torch.Tensor .*got list"),
    ("query_2d", dict(query=torch.randn(4, 32)),
     r"query must have 3 dims \[num_tokens, num_heads, head_dim\], got shape \(4, 32\)"),
    ("key_cache_3d", dict(key_cache=torch.randn(8, 4, 16)),
     r"key_cache must have 4 dims \[num_blocks, block_size, num_kv_heads, head_dim\], "
     r"got shape \(8, 4, 16\)"),
    ("block_table_1d", dict(block_table=torch.tensor([3, 1], dtype=torch.int32)),
     r"block_table must have 2 dims \[num_seqs, max_blocks_per_seq\], got shape \(2,\)"),
    ("seq_lens_2d", dict(seq_lens=torch.tensor([[5, 5]], dtype=torch.int32)),
     r"seq_lens must have 1 dims \[num_seqs\], got shape \(1, 2\)"),
    ("int_query", dict(query=torch.ones(4, NUM_HEADS, HEAD_DIM, dtype=torch.int32)),
     r"query has dtype torch.int32; expected one of float32, float16, bfloat16"),
    ("float_block_table", dict(block_table=torch.tensor([[3.0, 1.0], [6.0, 0.0]])),
     r"block_table has dtype torch.float32; expected one of int32, int64"),
    ("key_cache_dtype_mismatch",
     dict(key_cache=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                dtype=torch.float16)),
     r"key_cache dtype torch.float16 must match query dtype torch.float32"),
    ("value_cache_dtype_mismatch",
     dict(value_cache=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                  dtype=torch.bfloat16)),
     r"value_cache dtype torch.bfloat16 must match query dtype torch.float32"),
    ("value_cache_shape", dict(value_cache=torch.zeros(NUM_BLOCKS + 1, BLOCK_SIZE,
                                                       NUM_KV_HEADS, HEAD_DIM)),
     r"value_cache shape \(9, 4, 2, 8\) must equal key_cache shape \(8, 4, 2, 8\)"),
    ("head_dim_mismatch", dict(query=torch.randn(4, NUM_HEADS, HEAD_DIM + 1)),
     r"key_cache head_dim=8 must equal query head_dim=9"),
    ("heads_not_multiple", dict(query=torch.randn(4, 3, HEAD_DIM)),
     r"num_heads=3 \(query.shape\[1\]\) must be a multiple of num_kv_heads=2"),
    ("query_len_exceeds_seq_len", dict(seq_lens=torch.tensor([2, 5], dtype=torch.int32)),
     r"sequence 0: query_len=3 exceeds seq_len=2; seq_lens counts the context plus this chunk"),
    ("block_table_too_short", dict(seq_lens=torch.tensor([5, 9], dtype=torch.int32)),
     r"sequence 1: seq_len=9 needs 3 blocks of block_size=4 but block_table has only 2 columns"),
    ("block_id_too_large", dict(block_table=torch.tensor([[3, 1], [6, 8]], dtype=torch.int32)),
     r"sequence 1: block_table entries 6\.\.8 out of range \[0, num_blocks=8\)"),
    ("block_id_negative", dict(block_table=torch.tensor([[-1, 1], [6, 0]], dtype=torch.int32)),
     r"sequence 0: block_table entries -1\.\.1 out of range \[0, num_blocks=8\)"),
    ("block_table_rows", dict(block_table=torch.tensor([[3, 1]], dtype=torch.int32)),
     r"block_table has 1 rows; expected num_seqs=2"),
    ("query_start_loc_length", dict(query_start_loc=torch.tensor([0, 3], dtype=torch.int32)),
     r"query_start_loc has 2 entries; expected num_seqs \+ 1 = 3"),
    ("query_start_loc_not_zero", dict(query_start_loc=torch.tensor([1, 3, 4], dtype=torch.int32)),
     r"query_start_loc\[0\]=1; expected 0"),
    ("query_start_loc_last", dict(query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int32)),
     r"query_start_loc\[-1\]=5 must equal num_tokens=4"),
    ("query_start_loc_decreasing",
     dict(query_start_loc=torch.tensor([0, 5, 4], dtype=torch.int32),
          seq_lens=torch.tensor([5, 5], dtype=torch.int32)),
     r"query_start_loc must be non-decreasing; sequence 1 has q_len=-1"),
]


@pytest.mark.parametrize(
    "overrides, match", [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES]
)
def test_attention_bad_input(overrides, match):
    args = attention_args() | overrides
    with pytest.raises(ValueError, match=match):
        chunked_prefill_attention(**args)


WRITE_KV_CASES = [
    ("key_not_tensor", dict(key=None), r"key must be a torch.Tensor .*got NoneType"),
    ("key_2d", dict(key=torch.randn(3, 16)),
     r"key must have 3 dims \[num_tokens, num_kv_heads, head_dim\], got shape \(3, 16\)"),
    ("value_cache_5d", dict(value_cache=torch.zeros(1, NUM_BLOCKS, BLOCK_SIZE, 2, 8)),
     r"value_cache must have 4 dims .*got shape \(1, 8, 4, 2, 8\)"),
    ("slot_mapping_2d", dict(slot_mapping=torch.tensor([[0, 13, -1]])),
     r"slot_mapping must have 1 dims \[num_tokens\], got shape \(1, 3\)"),
    ("int_key", dict(key=torch.ones(3, NUM_KV_HEADS, HEAD_DIM, dtype=torch.int64)),
     r"key has dtype torch.int64; expected one of float32, float16, bfloat16"),
    ("float_slot_mapping", dict(slot_mapping=torch.tensor([0.0, 13.0, -1.0])),
     r"slot_mapping has dtype torch.float32; expected one of int32, int64"),
    ("cache_dtype_mismatch",
     dict(key_cache=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                dtype=torch.float16),
          value_cache=torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                                  dtype=torch.float16)),
     r"key_cache dtype torch.float16 must match key dtype torch.float32"),
    ("value_dtype_mismatch", dict(value=torch.randn(3, NUM_KV_HEADS, HEAD_DIM).half()),
     r"value dtype torch.float16 must match key dtype torch.float32"),
    ("value_shape", dict(value=torch.randn(2, NUM_KV_HEADS, HEAD_DIM)),
     r"value shape \(2, 2, 8\) must equal key shape \(3, 2, 8\)"),
    ("value_cache_shape", dict(value_cache=torch.zeros(NUM_BLOCKS, BLOCK_SIZE + 1, 2, 8)),
     r"value_cache shape \(8, 5, 2, 8\) must equal key_cache shape \(8, 4, 2, 8\)"),
    ("kv_heads_mismatch", dict(key=torch.randn(3, 4, HEAD_DIM), value=torch.randn(3, 4, HEAD_DIM)),
     r"key per-token shape \(4, 8\) must equal the cache's \[num_kv_heads, head_dim\] = \(2, 8\)"),
    ("slot_mapping_length", dict(slot_mapping=torch.tensor([0, 13])),
     r"slot_mapping has 2 entries; expected num_tokens=3"),
    ("slot_too_large", dict(slot_mapping=torch.tensor([0, 32, -1])),
     r"slot_mapping values -1\.\.32 out of range: expected -1 \(skip\) or "
     r"0 <= slot < num_blocks \* block_size = 32"),
    ("slot_below_minus_one", dict(slot_mapping=torch.tensor([0, -2, 5], dtype=torch.int32)),
     r"slot_mapping values -2\.\.5 out of range"),
]


@pytest.mark.parametrize(
    "overrides, match", [c[1:] for c in WRITE_KV_CASES], ids=[c[0] for c in WRITE_KV_CASES]
)
def test_write_kv_bad_input(overrides, match):
    args = write_kv_args() | overrides
    with pytest.raises(ValueError, match=match):
        write_kv(**args)


def test_write_kv_rejects_duplicate_slots():
    k = torch.randn(3, 2, 8)
    cache = torch.zeros(4, 4, 2, 8)
    with pytest.raises(ValueError, match="same slot twice"):
        write_kv(k, k, cache, cache, torch.tensor([5, -1, 5]))
    write_kv(k, k, cache, cache, torch.tensor([5, -1, -1]))  # repeated -1 is fine


def test_attention_rejects_negative_seq_len():
    q = torch.randn(0, 2, 8)
    cache = torch.zeros(4, 4, 2, 8)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]=-1"):
        chunked_prefill_attention(q, cache, cache, torch.zeros(1, 2, dtype=torch.int32),
                                  torch.tensor([0, 0], dtype=torch.int32),
                                  torch.tensor([-1], dtype=torch.int32))
