"""Triton kernels of unified paged attention; the launch logic and grid live in attention.py.

`_unified_attention_kernel` computes causal attention of a (request, chunk of query tokens, KV head)
Q tile over the paged cache with an online softmax in float32 (log2 domain: scores are scaled by
scale * log2(e) and exponentiated with exp2). With NUM_SEGMENTS > 1 it covers one slice of the
context and writes partial (max, sum, acc) that `_reduce_segments_kernel` merges (split-KV).
With USE_ALIBI each row adds slope[head] * (key_pos - q_pos) to its scores (in the log2 domain, so
the slope is scaled by log2(e) once per program).
With USE_SPANS (bidirectional spans, engine/attention_spans.py) each row sees keys up to its own
bound span_hi (>= its position) instead of its position, and with a window keys from
pos - window + 1 on (or from its span's start, min'd in, with SPAN_OVER_WINDOW); the tile ranges
and the unmasked middle are computed from those per-row bounds. Without it nothing changes.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    # Request r owns q blocks from query_start_loc[r] // BLOCK_Q + r on (see the grid derivation);
    # binary search for the last request whose first q block is <= q_block.
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): saturates cleanly to +-1 when e^2x overflows or underflows.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, row_lo, row_hi, alibi, tile_lo, tile_hi, key_end,
                  block_row, k_base,
                  v_base, stride_k_b, stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale,
                  HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
                  USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SPANS: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over key tiles [tile_lo, tile_hi). MASKED=False
    is for tiles every row sees whole: no key or score masks."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    d_valid = offs_d < HEAD_SIZE
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + offs_n
        key_valid = key_pos < key_end
        # BLOCK_SIZE is a power-of-2 constexpr: // and % are shifts and masks.
        if MASKED:
            block = tl.load(block_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        else:
            block = tl.load(block_row + key_pos // BLOCK_SIZE)
        block = block.to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        # Each key is HEAD_SIZE contiguous elements: 16-byte vector loads along d.
        k_ptrs = (k_base + block[None, :] * stride_k_b + in_block[None, :] * stride_k_s
                  + offs_d[:, None])  # [D_PAD, TILE_N]
        v_ptrs = (v_base + block[:, None] * stride_v_b + in_block[:, None] * stride_v_s
                  + offs_d[None, :])  # [TILE_N, D_PAD]
        if MASKED:
            k = tl.load(k_ptrs, mask=key_valid[None, :] & d_valid[:, None], other=0.0)
        elif HEAD_SIZE == HEAD_SIZE_PADDED:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if USE_SOFTCAP:
            s = _tanh(s) * softcap_scale
        if USE_ALIBI:
            # alibi [BLOCK_M] = slope * log2(e); the bias is <= 0 on every key a row may see.
            s += alibi[:, None] * (key_pos[None, :] - q_pos[:, None]).to(tl.float32)
        if MASKED:
            if USE_SPANS:  # row_lo / row_hi: each row's first and last visible key
                mask = key_valid[None, :] & (key_pos[None, :] <= row_hi[:, None])
                if SLIDING_WINDOW > 0:
                    mask = mask & (key_pos[None, :] >= row_lo[:, None])
            else:
                mask = key_valid[None, :] & (key_pos[None, :] <= q_pos[:, None])
                if SLIDING_WINDOW > 0:
                    mask = mask & (key_pos[None, :] > q_pos[:, None] - SLIDING_WINDOW)
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 to avoid inf - inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=key_valid[:, None] & d_valid[None, :], other=0.0)
        elif HEAD_SIZE == HEAD_SIZE_PADDED:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_chunk(out_ptr, q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, segm_out_ptr,
                  segm_max_ptr, segm_sum_ptr, alibi_slopes_ptr, span_lo_ptr, span_hi_ptr, qk_scale,
                  softcap_scale, req, kv_head, segment,
                  q_start, q_len, local_q0, seq_len, stride_q_t, stride_q_h, stride_o_t,
                  stride_o_h, stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s,
                  stride_v_h, stride_bt_r,
                  GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                  TILE_N: tl.constexpr, SLIDING_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                  USE_ALIBI: tl.constexpr, USE_SPANS: tl.constexpr,
                  SPAN_OVER_WINDOW: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Attention of query tokens [local_q0, local_q0 + BLOCK_Q) of request `req` (x the GROUP
    heads of `kv_head`) over its cache, or over one split-KV segment of it."""
    context_len = seq_len - q_len
    # Row m of the Q tile is query token m // GROUP of this chunk and head m % GROUP of the group.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    q_local = local_q0 + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    d_valid = offs_d < HEAD_SIZE
    q_pos = context_len + q_local  # absolute position of each row's token
    token = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if USE_ALIBI:
        alibi = tl.load(alibi_slopes_ptr + head, mask=row_valid, other=0.0) * 1.4426950408889634
    else:
        alibi = tl.zeros([BLOCK_M], tl.float32)

    # Keys [first_tile * TILE_N, key_end) cover every row's causal (and window) range.
    key_end = tl.minimum(context_len + local_q0 + BLOCK_Q, seq_len)
    end_tile = tl.cdiv(key_end, TILE_N)
    first_tile = 0
    if SLIDING_WINDOW > 0:
        first_tile = tl.maximum(context_len + local_q0 - SLIDING_WINDOW + 1, 0) // TILE_N
    if NUM_SEGMENTS > 1:
        tiles_per_segment = tl.cdiv(end_tile - first_tile, NUM_SEGMENTS)
        first_tile = first_tile + segment * tiles_per_segment
        end_tile = tl.minimum(first_tile + tiles_per_segment, end_tile)

    # Only tiles that cross a row's causal diagonal (or window start) need the score mask: split
    # [lo, hi) into masked [lo, a), unmasked [a, b), masked [b, hi). Keys below
    # context_len + local_q0 (the chunk's first position) are visible to every row; with a window,
    # so are keys above key_end - 1 - SLIDING_WINDOW (its last position's window start).
    row_lo = q_pos
    row_hi = q_pos
    if USE_SPANS:
        # Per-row bounds [row_lo, row_hi]; the same split from their extremes over the real rows
        # (every key in [max row_lo, min row_hi] is visible to every row).
        row_hi = tl.load(span_hi_ptr + token, mask=row_valid, other=0)
        if SLIDING_WINDOW > 0:
            row_lo = q_pos - SLIDING_WINDOW + 1
            if SPAN_OVER_WINDOW:
                row_lo = tl.minimum(row_lo, tl.load(span_lo_ptr + token, mask=row_valid, other=0))
            first_tile = tl.maximum(tl.min(tl.where(row_valid, row_lo, seq_len), 0), 0) // TILE_N
        causal_end = key_end
        key_end = tl.minimum(tl.maximum(tl.max(tl.where(row_valid, row_hi + 1, 0), 0), key_end),
                             seq_len)
        end_tile = tl.cdiv(key_end, TILE_N)
        lo = first_tile
        hi = end_tile
        full_lo = lo
        if SLIDING_WINDOW > 0:
            max_lo = tl.max(tl.where(row_valid, row_lo, 0), 0)
            full_lo = tl.maximum(tl.cdiv(tl.minimum(max_lo, causal_end), TILE_N), lo)
        a = tl.minimum(full_lo, hi)
        min_hi = tl.min(tl.where(row_valid, row_hi, seq_len), 0)
        b = tl.minimum(tl.maximum((min_hi + 1) // TILE_N, a), hi)
    else:
        lo = first_tile
        hi = end_tile
        full_lo = lo
        if SLIDING_WINDOW > 0:
            full_lo = tl.maximum(tl.cdiv(key_end - SLIDING_WINDOW, TILE_N), lo)
        a = tl.minimum(full_lo, hi)
        b = tl.minimum(tl.maximum((context_len + local_q0 + 1) // TILE_N, a), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], tl.float32)
    block_row = block_tables_ptr + req.to(tl.int64) * stride_bt_r
    k_base = key_cache_ptr + kv_head * stride_k_h
    v_base = value_cache_ptr + kv_head * stride_v_h
    if SLIDING_WINDOW > 0:
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, q_pos, row_lo, row_hi, alibi, lo, a, key_end, block_row, k_base, v_base, stride_k_b,
            stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale, HEAD_SIZE,
            HEAD_SIZE_PADDED, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_SPANS, True,
            DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, row_lo, row_hi, alibi, a, b, key_end, block_row, k_base, v_base, stride_k_b,
        stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale, HEAD_SIZE,
        HEAD_SIZE_PADDED, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_SPANS, False,
        DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, row_lo, row_hi, alibi, b, hi, key_end, block_row, k_base, v_base, stride_k_b,
        stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale, HEAD_SIZE,
        HEAD_SIZE_PADDED, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_SPANS, True,
        DOT_PRECISION)

    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        num_heads = tl.num_programs(1) * GROUP
        idx = (token * num_heads + head) * NUM_SEGMENTS + segment
        tl.store(segm_max_ptr + idx, m_i, mask=row_valid)
        tl.store(segm_sum_ptr + idx, l_i, mask=row_valid)
        tl.store(segm_out_ptr + idx[:, None] * HEAD_SIZE_PADDED + offs_d[None, :], acc,
                 mask=row_valid[:, None])


# num_reqs and the block-table width change from step to step; letting Triton specialise on them
# (== 1, divisible by 16) would compile new variants in the middle of serving.
@triton.jit(do_not_specialize=["num_reqs", "stride_bt_r"])
def _unified_attention_kernel(
    out_ptr,  # [T, H, D] q's dtype
    q_ptr,  # [T, H, D]
    key_cache_ptr,  # [NB, BS, KVH, D]
    value_cache_ptr,  # [NB, BS, KVH, D]
    block_tables_ptr,  # [R, MB] int32
    seq_lens_ptr,  # [R]
    query_start_loc_ptr,  # [R + 1]
    segm_out_ptr,  # [T, H, NUM_SEGMENTS, HEAD_SIZE_PADDED] float32 (split-KV only)
    segm_max_ptr,  # [T, H, NUM_SEGMENTS] float32, log2 domain (split-KV only)
    segm_sum_ptr,  # [T, H, NUM_SEGMENTS] float32 (split-KV only)
    alibi_slopes_ptr,  # [H] float32 (ALiBi only)
    span_lo_ptr,  # [T] int32: first position of each query token's span (USE_SPANS only)
    span_hi_ptr,  # [T] int32: last key position each query token sees (USE_SPANS only)
    qk_scale,  # float32: scale * log2(e); scale / softcap when soft-capping
    softcap_scale,  # float32: softcap * log2(e) (soft-capping only)
    num_reqs,
    stride_q_t, stride_q_h,
    stride_o_t, stride_o_h,
    stride_k_b, stride_k_s, stride_k_h,
    stride_v_b, stride_v_s, stride_v_h,
    stride_bt_r,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,  # next power of 2 of HEAD_SIZE
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows of the Q tile, >= BLOCK_Q * GROUP
    TILE_N: tl.constexpr,  # keys per inner iteration
    DECODE_BLOCK_M: tl.constexpr,  # Q tile rows for a 1-token request: GROUP padded to >= 16
    DECODE_TILE_N: tl.constexpr,  # keys per iteration for a 1-token request
    SLIDING_WINDOW: tl.constexpr,  # 0: no window
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,  # add slope[head] * (key_pos - q_pos) to the scores
    USE_SPANS: tl.constexpr,  # bidirectional spans: rows see keys up to span_hi
    SPAN_OVER_WINDOW: tl.constexpr,  # a span's keys stay visible beyond the window
    DECODE_ONLY: tl.constexpr,  # every request has <= 1 query token: program 0 index = request
    NUM_SEGMENTS: tl.constexpr,  # 1: write out; > 1: write split-KV partials
    DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    if DECODE_ONLY:
        req = q_block
        local_q0 = 0
    else:
        req = _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q)
        first_q_block = tl.load(query_start_loc_ptr + req) // BLOCK_Q + req
        local_q0 = (q_block - first_q_block) * BLOCK_Q
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if local_q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    if BLOCK_M > DECODE_BLOCK_M and not DECODE_ONLY:
        # A decode in a mixed batch takes a 1-token tile instead of a BLOCK_M-row one that would
        # be mostly padding: same K/V bytes, a fraction of the dot work.
        if q_len == 1:
            _attend_chunk(
                out_ptr, q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, segm_out_ptr,
                segm_max_ptr, segm_sum_ptr, alibi_slopes_ptr, span_lo_ptr, span_hi_ptr, qk_scale,
                softcap_scale, req, kv_head, segment, q_start, q_len, local_q0, seq_len, stride_q_t, stride_q_h,
                stride_o_t, stride_o_h, stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s,
                stride_v_h, stride_bt_r, GROUP, HEAD_SIZE, HEAD_SIZE_PADDED, BLOCK_SIZE, 1,
                DECODE_BLOCK_M, DECODE_TILE_N, SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_SPANS,
                SPAN_OVER_WINDOW, NUM_SEGMENTS, DOT_PRECISION)
            return
    _attend_chunk(
        out_ptr, q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, segm_out_ptr,
        segm_max_ptr, segm_sum_ptr, alibi_slopes_ptr, span_lo_ptr, span_hi_ptr, qk_scale,
        softcap_scale, req, kv_head, segment, q_start, q_len, local_q0, seq_len, stride_q_t, stride_q_h, stride_o_t,
        stride_o_h, stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s,
        stride_v_h, stride_bt_r, GROUP, HEAD_SIZE, HEAD_SIZE_PADDED, BLOCK_SIZE, BLOCK_Q,
        BLOCK_M, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, USE_SPANS, SPAN_OVER_WINDOW,
        NUM_SEGMENTS, DOT_PRECISION)


@triton.jit
def _reduce_segments_kernel(
    out_ptr,  # [T, H, D]
    segm_out_ptr,  # [T, H, NUM_SEGMENTS, HEAD_SIZE_PADDED] float32
    segm_max_ptr,  # [T, H, NUM_SEGMENTS] float32
    segm_sum_ptr,  # [T, H, NUM_SEGMENTS] float32
    stride_o_t, stride_o_h,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    idx = (token * tl.num_programs(1) + head) * NUM_SEGMENTS + offs_s
    m = tl.load(segm_max_ptr + idx)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_all)  # empty segments hold m = -inf and weigh 0
    denom = tl.sum(w * tl.load(segm_sum_ptr + idx), 0)
    acc = tl.load(segm_out_ptr + idx[:, None] * HEAD_SIZE_PADDED + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_SIZE)
