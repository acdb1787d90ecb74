"""Unified paged attention in Triton: one launch for a mixed batch of prefill chunks and decodes.

Same contract as `reference.unified_attention`. Two paths, chosen in `unified_attention` from shapes
alone (no host syncs, so it can be captured in a CUDA graph):

- 2D (the default): a program owns one request's chunk of BLOCK_Q query tokens times the GROUP query
  heads that share one KV head, as BLOCK_M = BLOCK_Q * GROUP rows of one Q tile. K/V tiles are
  therefore loaded once per KV head and reused by every query head of the group (GQA/MQA), and for
  decodes (BLOCK_Q = 1) a program reads its request's K/V exactly once.
- split-KV (flash-decoding), for all-decode batches with too few (request, KV head) pairs to fill
  the SMs while contexts are long: the same kernel runs over NUM_SEGMENTS slices of the context and
  writes partial (max, sum, acc); `_reduce_segments_kernel` merges them.

Online softmax in float32 in the log2 domain: scores are multiplied by scale * log2(e) and
exponentiated with exp2.
"""
from __future__ import annotations

import functools

import torch
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
def _attend_tiles(acc, m_i, l_i, q, q_pos, tile_lo, tile_hi, key_end, block_row, k_base, v_base,
                  stride_k_b, stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale,
                  HEAD_SIZE: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
                  USE_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
        if MASKED:
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
    SLIDING_WINDOW: tl.constexpr,  # 0: no window
    USE_SOFTCAP: tl.constexpr,
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
            acc, m_i, l_i, q, q_pos, lo, a, key_end, block_row, k_base, v_base, stride_k_b,
            stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale, HEAD_SIZE,
            HEAD_SIZE_PADDED, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, True, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, a, b, key_end, block_row, k_base, v_base, stride_k_b,
        stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale, HEAD_SIZE,
        HEAD_SIZE_PADDED, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, False, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, b, hi, key_end, block_row, k_base, v_base, stride_k_b,
        stride_k_s, stride_v_b, stride_v_s, qk_scale, softcap_scale, HEAD_SIZE,
        HEAD_SIZE_PADDED, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, USE_SOFTCAP, True, DOT_PRECISION)

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


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: behave as on an H100
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _tile_config(head_size_padded: int, group: int, max_query_len: int, decode_only: bool,
                 dtype: torch.dtype, num_q_tokens: int, num_kv_heads: int,
                 num_sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_Q, BLOCK_M, TILE_N, num_warps, num_stages), tuned on an H200 with Triton 3.6 (bf16,
    block size 16; see benchmarks/bench_kernels.py).

    Decodes are bound by reading K/V: a 16-row Q tile (the minimum for tl.dot) per request and KV
    head, 64 keys (32 for head size 256) per step, 2 warps, 2 stages; measured at ~98% of the
    device-to-device copy bandwidth for batch 64 x 2048. Prefill chunks are bound by the dots:
    64-row Q tiles with 32-key steps and 4 warps, or 128-row tiles when the batch still gives
    every SM four programs.
    """
    big_head = head_size_padded > 128
    if decode_only:
        tile_n = 32 if big_head or dtype == torch.float32 else 64
        return 1, max(16, triton.next_power_of_2(group)), tile_n, 2, 2
    rows = max_query_len * group
    programs_at_128 = num_q_tokens * group // 128 * num_kv_heads
    if rows >= 128 and not big_head and programs_at_128 >= 4 * num_sms:
        block_m = 128
    else:
        block_m = 64 if rows >= 64 else 16
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m // group, block_m, 32, 4, 2


def _num_segments(num_reqs: int, num_kv_heads: int, max_seq_len: int, tile_n: int,
                  num_sms: int) -> int:
    """Split-KV segments for an all-decode batch: 1 (no split) unless the (request, KV head)
    programs would leave SMs idle and each segment still gets a few tiles of context."""
    programs = num_reqs * num_kv_heads
    if programs >= num_sms or max_seq_len < 8 * tile_n:
        return 1
    segments = triton.next_power_of_2(triton.cdiv(2 * num_sms, programs))
    segments = min(segments, 64, triton.next_power_of_2(max_seq_len // (2 * tile_n)))
    return max(segments, 1)


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, max_query_len: int, max_seq_len: int,
                      scale: float, sliding_window: int | None = None,
                      softcap: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `reference.unified_attention` (same arguments and result)."""
    return launch_unified_attention(q, key_cache, value_cache, query_start_loc, seq_lens,
                                    block_tables, max_query_len, max_seq_len, scale,
                                    sliding_window=sliding_window, softcap=softcap, out=out)


def launch_unified_attention(q, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
                             max_query_len, max_seq_len, scale, sliding_window=None, softcap=None,
                             out=None, num_segments: int | None = None) -> torch.Tensor:
    """`unified_attention` with the split-KV choice exposed: num_segments=None picks from the
    shapes; an int > 1 forces the split-KV path (all-decode batches only)."""
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert block_size & (block_size - 1) == 0, "cache block size must be a power of 2"
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    if out is None:
        out = torch.empty_like(q)
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_size_padded = triton.next_power_of_2(head_size)
    decode_only = max_query_len <= 1
    num_sms = _sm_count(q.device)
    block_q, block_m, tile_n, num_warps, num_stages = _tile_config(
        head_size_padded, group, max_query_len, decode_only, q.dtype, num_tokens, num_kv_heads,
        num_sms)
    if num_segments is None:
        num_segments = (_num_segments(num_reqs, num_kv_heads, max_seq_len, tile_n, num_sms)
                        if decode_only else 1)
    assert num_segments == 1 or decode_only, "split-KV needs an all-decode batch"
    if softcap:
        qk_scale, softcap_scale = scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_scale = scale * LOG2E, 0.0

    # Grid. Axis 0: a decode-only batch has one program per request. Otherwise request r's q
    # blocks are numbered from query_start_loc[r] // BLOCK_Q + r: it needs ceil(len_r / BLOCK_Q)
    # blocks and the next request's numbering starts at least that many later, so
    # T // BLOCK_Q + R programs cover every request without a host-side scan; programs past
    # their request's last block return at once. Axis 1: one program per KV head (all GROUP
    # query heads in one tile). Axis 2: split-KV segments.
    num_q_blocks = num_reqs if decode_only else num_tokens // block_q + num_reqs
    grid = (num_q_blocks, num_kv_heads, num_segments)
    if num_segments > 1:
        segm_out = torch.empty(num_tokens, num_heads, num_segments, head_size_padded,
                               dtype=torch.float32, device=q.device)
        segm_max = torch.empty(num_tokens, num_heads, num_segments, dtype=torch.float32,
                               device=q.device)
        segm_sum = torch.empty_like(segm_max)
    else:
        segm_out = segm_max = segm_sum = out  # unused
    _unified_attention_kernel[grid](
        out_ptr=out, q_ptr=q, key_cache_ptr=key_cache, value_cache_ptr=value_cache,
        block_tables_ptr=block_tables, seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc, segm_out_ptr=segm_out, segm_max_ptr=segm_max,
        segm_sum_ptr=segm_sum, qk_scale=qk_scale, softcap_scale=softcap_scale,
        num_reqs=num_reqs,
        stride_q_t=q.stride(0), stride_q_h=q.stride(1),
        stride_o_t=out.stride(0), stride_o_h=out.stride(1),
        stride_k_b=key_cache.stride(0), stride_k_s=key_cache.stride(1),
        stride_k_h=key_cache.stride(2),
        stride_v_b=value_cache.stride(0), stride_v_s=value_cache.stride(1),
        stride_v_h=value_cache.stride(2),
        stride_bt_r=block_tables.stride(0),
        GROUP=group, HEAD_SIZE=head_size, HEAD_SIZE_PADDED=head_size_padded,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n,
        SLIDING_WINDOW=sliding_window or 0, USE_SOFTCAP=bool(softcap),
        DECODE_ONLY=decode_only, NUM_SEGMENTS=num_segments,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_segments > 1:
        # Grid: one program per (token, query head) merges that row's NUM_SEGMENTS partials.
        _reduce_segments_kernel[(num_tokens, num_heads)](
            out_ptr=out, segm_out_ptr=segm_out, segm_max_ptr=segm_max, segm_sum_ptr=segm_sum,
            stride_o_t=out.stride(0), stride_o_h=out.stride(1),
            HEAD_SIZE=head_size, HEAD_SIZE_PADDED=head_size_padded, NUM_SEGMENTS=num_segments,
            num_warps=4,
        )
    return out

