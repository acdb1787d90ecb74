"""Unified paged attention in Triton: one launch for a mixed batch of prefill chunks and decodes.

Same contract as `reference.unified_attention`. Two paths, chosen in `unified_attention` from shapes
alone (no host syncs, so it can be captured in a CUDA graph):

- 2D (the default): a program owns one request's chunk of BLOCK_Q query tokens times the GROUP query
  heads that share one KV head, as BLOCK_M = BLOCK_Q * GROUP rows of one Q tile. K/V tiles are
  therefore loaded once per KV head and reused by every query head of the group (GQA/MQA), and for
  decodes (BLOCK_Q = 1) a program reads its request's K/V exactly once. In a mixed batch with
  large prefill tiles, a 1-token request branches to a 16-row decode tile inside the same launch.
- split-KV (flash-decoding), for all-decode batches with too few (request, KV head) pairs to fill
  the SMs while contexts are long: the same kernel runs over NUM_SEGMENTS slices of the context and
  writes partial (max, sum, acc); `_reduce_segments_kernel` merges them.

The kernels themselves are in attention_kernels.py.
"""
from __future__ import annotations

import functools

import torch
import triton

from kubeinfer.kernels.attention_kernels import (LOG2E, _reduce_segments_kernel,
                                                 _unified_attention_kernel)


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
    """(BLOCK_Q, BLOCK_M, TILE_N, num_warps, num_stages), swept on an H200 with Triton 3.6 (bf16,
    head size 128 and 256, block size 16; benchmarks/bench_kernels.py).

    Decodes are bound by reading K/V: a 16-row Q tile (the minimum for tl.dot) per request and KV
    head, 64 keys (32 for head size 256) per step, 2 warps, 2 stages: batch 64 x 2048 reads at
    97% of the device-to-device copy bandwidth on an H100 (101% on an H200). Prefill chunks are
    bound by the dots: 64-row Q tiles with 32-key steps and 4 warps, or 128-row tiles when the
    batch still gives every SM four programs (~310 TFLOP/s for 2 x 4096 causal, head 128).
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
                      softcap: float | None = None, out: torch.Tensor | None = None,
                      alibi_slopes: torch.Tensor | None = None,
                      span_lo: torch.Tensor | None = None, span_hi: torch.Tensor | None = None,
                      span_over_window: bool = False) -> torch.Tensor:
    """Triton version of `reference.unified_attention` (same arguments and result)."""
    return launch_unified_attention(q, key_cache, value_cache, query_start_loc, seq_lens,
                                    block_tables, max_query_len, max_seq_len, scale,
                                    sliding_window=sliding_window, softcap=softcap, out=out,
                                    alibi_slopes=alibi_slopes, span_lo=span_lo, span_hi=span_hi,
                                    span_over_window=span_over_window)


def launch_unified_attention(q, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
                             max_query_len, max_seq_len, scale, sliding_window=None, softcap=None,
                             out=None, num_segments: int | None = None,
                             alibi_slopes: torch.Tensor | None = None,
                             span_lo: torch.Tensor | None = None,
                             span_hi: torch.Tensor | None = None,
                             span_over_window: bool = False) -> torch.Tensor:
    """`unified_attention` with the split-KV choice exposed: num_segments=None picks from the
    shapes; an int > 1 forces the split-KV path (all-decode batches only)."""
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert block_size & (block_size - 1) == 0, "cache block size must be a power of 2"
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    if alibi_slopes is not None:
        assert (alibi_slopes.shape == (num_heads,) and alibi_slopes.dtype == torch.float32
                and alibi_slopes.is_contiguous()), "alibi_slopes must be [num_heads] float32"
    if out is None:
        out = torch.empty_like(q)
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_size_padded = triton.next_power_of_2(head_size)
    decode_only = max_query_len <= 1
    # a 1-token chunk cannot hold a span of 2 or more (the scheduler computes a span whole)
    use_spans = span_hi is not None and not decode_only
    if use_spans:
        assert span_hi.shape == (num_tokens,) and span_hi.dtype == torch.int32, \
            "span_hi must be [num_tokens] int32"
        assert not span_over_window or (span_lo is not None and span_lo.shape == span_hi.shape
                                        and span_lo.dtype == torch.int32)
    num_sms = _sm_count(q.device)
    block_q, block_m, tile_n, num_warps, num_stages = _tile_config(
        head_size_padded, group, max_query_len, decode_only, q.dtype, num_tokens, num_kv_heads,
        num_sms)
    decode_cfg = _tile_config(head_size_padded, group, 1, True, q.dtype, num_tokens,
                              num_kv_heads, num_sms)
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
        segm_sum_ptr=segm_sum,
        alibi_slopes_ptr=alibi_slopes if alibi_slopes is not None else segm_max,  # unused if None
        span_lo_ptr=span_lo if use_spans and span_lo is not None else seq_lens,  # unused if not
        span_hi_ptr=span_hi if use_spans else seq_lens,
        qk_scale=qk_scale, softcap_scale=softcap_scale,
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
        DECODE_BLOCK_M=decode_cfg[1], DECODE_TILE_N=decode_cfg[2],
        SLIDING_WINDOW=sliding_window or 0, USE_SOFTCAP=bool(softcap),
        USE_ALIBI=alibi_slopes is not None, USE_SPANS=use_spans,
        SPAN_OVER_WINDOW=use_spans and span_over_window and bool(sliding_window),
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

