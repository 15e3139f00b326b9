"""Triton kernel sources: one source for CUDA Triton, triton-ascend and the interpreter.

Do not import this module directly: ``dcpp.kernels._loader.load_kernels(interpret)`` loads a
fresh copy per mode, because ``triton.jit`` decides at decoration time whether a kernel is
compiled or interpreted (``TRITON_INTERPRET``). Portability rules followed here (DESIGN.md §4):
plain masked pointer arithmetic, power-of-2 ``tl.arange`` sizes with padding, ``tl.dot`` with
M, N, K >= 16 and ``ieee`` precision, a persistent 1-D grid, one scalar block-id load per KV
tile when the tile lies inside one page, no ``break``/``continue``, fp32 math under the
interpreter (``COMPUTE_FP32``) because bf16 dot/elementwise math is wrong there.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_kv_tile(
    acc,  # [BLOCK_M, BLOCK_D] fp32, unnormalised output
    m_i,  # [BLOCK_M] fp32, running max of log2-scaled scores
    l_i,  # [BLOCK_M] fp32, running softmax denominator
    q,  # [BLOCK_M, BLOCK_D] query tile (fp32 when COMPUTE_FP32)
    q_pos,  # [BLOCK_M] int32, absolute position of each query row in its sequence
    tile,  # scalar: KV tile index; covers positions [tile * BLOCK_N, (tile + 1) * BLOCK_N)
    bt_row,  # pointer to this sequence's block_table row
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    kv_head,
    seq_len,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    scale_log2e,
    offs_n,  # [BLOCK_N] arange
    offs_d,  # [BLOCK_D] arange
    d_mask,  # [BLOCK_D] bool, offs_d < head_dim
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED_TILE: tl.constexpr,
    MASKED: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
):
    kv_pos = tile * BLOCK_N + offs_n  # [BLOCK_N] absolute KV positions
    kv_valid = kv_pos < seq_len  # [BLOCK_N]; all True on unmasked tiles
    if PAGED_TILE:
        # The tile lies inside one page: one scalar block-id load, affine (block) addresses.
        tile_start = tile * BLOCK_N
        block_id = tl.load(bt_row + tile_start // BLOCK_SIZE).to(tl.int64)
        slot_in_page = (tile_start % BLOCK_SIZE) + offs_n  # [BLOCK_N]
        k_rows = block_id * stride_kb + slot_in_page * stride_ks  # [BLOCK_N] int64
        v_rows = block_id * stride_vb + slot_in_page * stride_vs  # [BLOCK_N] int64
    else:
        # Pages smaller than a tile or of non-power-of-2 size: one block id per position.
        if MASKED:
            block_ids = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)
        else:
            block_ids = tl.load(bt_row + kv_pos // BLOCK_SIZE)
        block_ids = block_ids.to(tl.int64)  # [BLOCK_N]
        slot_in_page = kv_pos % BLOCK_SIZE  # [BLOCK_N]
        k_rows = block_ids * stride_kb + slot_in_page * stride_ks  # [BLOCK_N] int64
        v_rows = block_ids * stride_vb + slot_in_page * stride_vs  # [BLOCK_N] int64
    k_ptrs = k_cache_ptr + (k_rows + kv_head * stride_kh)[:, None] + offs_d[None, :]
    v_ptrs = v_cache_ptr + (v_rows + kv_head * stride_vh)[:, None] + offs_d[None, :]
    if MASKED:
        # Masked loads (other=0) keep NaN-poisoned unused slots out of the math.
        kv_mask = kv_valid[:, None] & d_mask[None, :]  # [BLOCK_N, BLOCK_D]
    else:
        kv_mask = d_mask[None, :]  # [1, BLOCK_D]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if COMPUTE_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
    s = s * scale_log2e
    if MASKED:
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]  # [BLOCK_M, BLOCK_N]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]; finite because m_i starts finite
    alpha = tl.exp2(m_i - m_new)  # [BLOCK_M]
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if COMPUTE_FP32:
        acc += tl.dot(p, v, input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def chunked_prefill_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    work_ptr,  # [num_items, 2] int32: (sequence, first query index of the tile in its chunk)
    num_items,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    scale_log2e,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # page size (tokens per KV block)
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # next power of 2 of GROUP
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD (>= 16): rows of the packed query tile
    BLOCK_N: tl.constexpr,  # KV positions per tile (>= 16)
    BLOCK_D: tl.constexpr,  # next power of 2 of HEAD_DIM (>= 16)
    PAGED_TILE: tl.constexpr,  # BLOCK_SIZE % BLOCK_N == 0: every tile inside one page
    COMPUTE_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] row = token_in_tile * GROUP_PAD + head_in_group
    token_in_tile = offs_m // GROUP_PAD  # [BLOCK_M]
    offs_q = tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
    offs_g = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = offs_d < HEAD_DIM  # [BLOCK_D]
    total_work = num_items * num_kv_heads
    # Persistent 1-D grid over (sequence, query tile) x kv_head work items.
    for work in range(pid, total_work, num_programs):
        item = work // num_kv_heads
        kv_head = work % num_kv_heads
        seq = tl.load(work_ptr + 2 * item)
        q_tile_start = tl.load(work_ptr + 2 * item + 1)
        q_start = tl.load(query_start_loc_ptr + seq)
        query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - query_len

        # Query tile as [BLOCK_Q, GROUP_PAD, BLOCK_D] (affine in every dim, so it stays a block
        # copy on Ascend), then reshaped to the packed [BLOCK_M, BLOCK_D] GQA tile.
        tok = q_tile_start + offs_q  # [BLOCK_Q] index inside this chunk
        tok_rows = (q_start + tok).to(tl.int64)  # [BLOCK_Q] token row in query/out
        head = kv_head * GROUP + offs_g  # [GROUP_PAD]
        io_mask = ((tok < query_len)[:, None, None] & (offs_g < GROUP)[None, :, None]
                   & d_mask[None, None, :])  # [BLOCK_Q, GROUP_PAD, BLOCK_D]
        q_offs = (tok_rows[:, None, None] * stride_qt + head[None, :, None] * stride_qh
                  + offs_d[None, None, :])  # [BLOCK_Q, GROUP_PAD, BLOCK_D]
        q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0)
        q = tl.reshape(q, [BLOCK_M, BLOCK_D])  # row = token * GROUP_PAD + head_in_group
        if COMPUTE_FP32:
            q = q.to(tl.float32)  # [BLOCK_M, BLOCK_D]
        q_pos = context_len + q_tile_start + token_in_tile  # [BLOCK_M] absolute positions

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: no inf - inf
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

        first_pos = context_len + q_tile_start  # position of the tile's first query token
        last_pos = tl.minimum(first_pos + BLOCK_Q - 1, seq_len - 1)
        # KV tiles wholly at or before first_pos are visible to every row: no mask work.
        num_full_tiles = (first_pos + 1) // BLOCK_N
        num_tiles = (last_pos + BLOCK_N) // BLOCK_N  # cdiv(last_pos + 1, BLOCK_N)
        bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
        for tile in range(0, num_full_tiles):
            acc, m_i, l_i = _attend_kv_tile(
                acc, m_i, l_i, q, q_pos, tile, bt_row, k_cache_ptr, v_cache_ptr, kv_head,
                seq_len, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                scale_log2e, offs_n, offs_d, d_mask,
                BLOCK_SIZE, BLOCK_N, PAGED_TILE, False, COMPUTE_FP32,
            )
        for tile in range(num_full_tiles, num_tiles):
            acc, m_i, l_i = _attend_kv_tile(
                acc, m_i, l_i, q, q_pos, tile, bt_row, k_cache_ptr, v_cache_ptr, kv_head,
                seq_len, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                scale_log2e, offs_n, offs_d, d_mask,
                BLOCK_SIZE, BLOCK_N, PAGED_TILE, True, COMPUTE_FP32,
            )
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # padded rows only
        out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_D] fp32
        out = tl.reshape(out, [BLOCK_Q, GROUP_PAD, BLOCK_D])
        o_offs = (tok_rows[:, None, None] * stride_ot + head[None, :, None] * stride_oh
                  + offs_d[None, None, :])  # [BLOCK_Q, GROUP_PAD, BLOCK_D]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim] (viewed as same-width ints: bit copy)
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int, -1 = skip
    num_tokens,
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # page size
    BLOCK_H: tl.constexpr,  # next power of 2 of num_kv_heads
    BLOCK_D: tl.constexpr,  # next power of 2 of HEAD_DIM
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    hd_mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]  # [BLOCK_H, BLOCK_D]
    # One token per iteration: a scalar slot load, then one block copy of [heads, head_dim].
    for token in range(pid, num_tokens, num_programs):
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        # (vector compare, not `hd_mask & (slot >= 0)`: the interpreter turns a bool block &
        # bool scalar into int32, which its loads/stores reject as a mask)
        keep = (offs_h.to(tl.int64) * 0 + slot) >= 0  # [BLOCK_H], all equal
        mask = hd_mask & keep[:, None]  # [BLOCK_H, BLOCK_D]
        block_id = slot // BLOCK_SIZE
        slot_in_page = slot % BLOCK_SIZE
        t64 = tl.cast(token, tl.int64)
        k = tl.load(key_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                    mask=mask)  # [BLOCK_H, BLOCK_D]
        v = tl.load(value_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                    mask=mask)  # [BLOCK_H, BLOCK_D]
        k_dst = block_id * stride_kcb + slot_in_page * stride_kcs
        v_dst = block_id * stride_vcb + slot_in_page * stride_vcs
        tl.store(k_cache_ptr + k_dst + offs_h[:, None] * stride_kch + offs_d[None, :], k, mask=mask)
        tl.store(v_cache_ptr + v_dst + offs_h[:, None] * stride_vch + offs_d[None, :], v, mask=mask)
