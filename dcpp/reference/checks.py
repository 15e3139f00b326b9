"""Input validation shared by the reference and the Triton kernels.

Public functions validate at the boundary and raise ``ValueError`` with a message that names the
argument, what was given and what is expected (DESIGN.md §5.2). Internal code uses ``assert``.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int, dtypes=None, shape_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {shape_hint}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dims {shape_hint}, got shape {tuple(t.shape)}"
        )
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {allowed}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in ``others`` must be on ``ref``'s device (kernels cannot mix devices)."""
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}; expected {ref_name}'s device {ref.device}")


def check_attention_inputs(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
) -> tuple[list[int], list[int]]:
    """Validate chunked-prefill attention inputs; return (query_lens, seq_lens) as Python lists."""
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES,
                 shape_hint="[num_tokens, num_heads, head_dim]")
    kv_hint = "[num_blocks, block_size, num_kv_heads, head_dim]"
    check_tensor("key_cache", key_cache, ndim=4, dtypes=FLOAT_DTYPES, shape_hint=kv_hint)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=FLOAT_DTYPES, shape_hint=kv_hint)
    ints = (torch.int32, torch.int64)
    check_tensor("block_table", block_table, ndim=2, dtypes=ints,
                 shape_hint="[num_seqs, max_blocks_per_seq]")
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=ints,
                 shape_hint="[num_seqs + 1]")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=ints, shape_hint="[num_seqs]")

    if key_cache.shape != value_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
            f"{tuple(key_cache.shape)}"
        )
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != query.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match query dtype {query.dtype}")
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, kv_head_dim = key_cache.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"key_cache head_dim={kv_head_dim} must equal query head_dim={head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} (query.shape[1]) must be a multiple of "
            f"num_kv_heads={num_kv_heads} (key_cache.shape[2])"
        )
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries; expected "
            f"num_seqs + 1 = {num_seqs + 1} (num_seqs from seq_lens)"
        )
    if block_table.shape[0] != num_seqs:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows; expected num_seqs={num_seqs}"
        )
    qsl = [int(x) for x in query_start_loc.tolist()]
    sl = [int(x) for x in seq_lens.tolist()]
    if qsl[0] != 0:
        raise ValueError(f"query_start_loc[0]={qsl[0]}; expected 0")
    if qsl[-1] != num_tokens:
        raise ValueError(
            f"query_start_loc[-1]={qsl[-1]} must equal num_tokens={num_tokens} (query.shape[0])"
        )
    query_lens = [qsl[i + 1] - qsl[i] for i in range(num_seqs)]
    max_blocks = block_table.shape[1]
    for i, (q_len, seq_len) in enumerate(zip(query_lens, sl)):
        if q_len < 0:
            raise ValueError(f"query_start_loc must be non-decreasing; sequence {i} has q_len={q_len}")
        if seq_len < 0:
            raise ValueError(f"seq_lens[{i}]={seq_len}; expected >= 0 (context_len + query_len)")
        if q_len > seq_len:
            raise ValueError(
                f"sequence {i}: query_len={q_len} exceeds seq_len={seq_len}; seq_lens counts "
                "the context plus this chunk, so it must be >= the chunk's query length"
            )
        needed = -(-seq_len // block_size)
        if needed > max_blocks:
            raise ValueError(
                f"sequence {i}: seq_len={seq_len} needs {needed} blocks of block_size={block_size} "
                f"but block_table has only {max_blocks} columns; widen block_table"
            )
        if needed:
            ids = block_table[i, :needed]
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= num_blocks:
                raise ValueError(
                    f"sequence {i}: block_table entries {lo}..{hi} out of range "
                    f"[0, num_blocks={num_blocks})"
                )
    return query_lens, sl


def check_write_kv_inputs(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int
) -> None:
    hint = "[num_tokens, num_kv_heads, head_dim]"
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, shape_hint=hint)
    check_tensor("value", value, ndim=3, dtypes=FLOAT_DTYPES, shape_hint=hint)
    kv_hint = "[num_blocks, block_size, num_kv_heads, head_dim]"
    check_tensor("key_cache", key_cache, ndim=4, dtypes=FLOAT_DTYPES, shape_hint=kv_hint)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=FLOAT_DTYPES, shape_hint=kv_hint)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64),
                 shape_hint="[num_tokens]")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
            f"{tuple(key_cache.shape)}"
        )
    if key.shape[1:] != key_cache.shape[2:]:
        raise ValueError(
            f"key per-token shape {tuple(key.shape[1:])} must equal the cache's "
            f"[num_kv_heads, head_dim] = {tuple(key_cache.shape[2:])}"
        )
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries; expected num_tokens={key.shape[0]}"
        )
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != key.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match key dtype {key.dtype}")
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    if slot_mapping.numel():
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(
                f"slot_mapping values {lo}..{hi} out of range: expected -1 (skip) or "
                f"0 <= slot < num_blocks * block_size = {num_slots}"
            )
        written = slot_mapping[slot_mapping >= 0]
        if torch.unique(written).numel() != written.numel():
            raise ValueError(
                "slot_mapping writes the same slot twice; expected distinct slots per call "
                "(use -1 to skip a token)"
            )
