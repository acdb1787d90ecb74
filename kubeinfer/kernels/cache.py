"""reshape_and_cache in Triton: scatter new K/V rows into the paged cache.

Same contract as `reference.reshape_and_cache`. key/value may be strided views (e.g. slices of a
fused QKV projection) as long as the head dimension is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [T, KVH, D]
    value_ptr,  # [T, KVH, D]
    key_cache_ptr,  # [NB, BS, KVH, D]
    value_cache_ptr,  # [NB, BS, KVH, D]
    slot_mapping_ptr,  # [T] int64 (or int32); -1 skips the token
    stride_k_t, stride_k_h,
    stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_s, stride_kc_h,
    stride_vc_b, stride_vc_s, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_H: tl.constexpr,  # next power of 2 of NUM_KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of 2 of HEAD_SIZE
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_SIZE)
    # Cache offsets in int64: a large cache exceeds 2**31 elements.
    k = tl.load(key_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :],
                mask=mask)
    tl.store(key_cache_ptr + block * stride_kc_b + in_block * stride_kc_s
             + offs_h[:, None] * stride_kc_h + offs_d[None, :],
             k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :],
                mask=mask)
    tl.store(value_cache_ptr + block * stride_vc_b + in_block * stride_vc_s
             + offs_h[:, None] * stride_vc_h + offs_d[None, :],
             v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton version of `reference.reshape_and_cache` (same arguments, writes the caches)."""
    num_tokens, num_kv_heads, head_size = key.shape
    block_size = key_cache.shape[1]
    if num_tokens == 0:
        return
    assert block_size & (block_size - 1) == 0, "cache block size must be a power of 2"
    assert key.stride(2) == 1 and value.stride(2) == 1
    assert key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_size)
    # Grid: one program per token copies its [KVH, D] key and value rows (a few KiB: enough work
    # per program, and T programs fill the GPU for any prefill; decodes are latency-bound anyway).
    _reshape_and_cache_kernel[(num_tokens,)](
        key_ptr=key, value_ptr=value, key_cache_ptr=key_cache, value_cache_ptr=value_cache,
        slot_mapping_ptr=slot_mapping,
        stride_k_t=key.stride(0), stride_k_h=key.stride(1),
        stride_v_t=value.stride(0), stride_v_h=value.stride(1),
        stride_kc_b=key_cache.stride(0), stride_kc_s=key_cache.stride(1),
        stride_kc_h=key_cache.stride(2),
        stride_vc_b=value_cache.stride(0), stride_vc_s=value_cache.stride(1),
        stride_vc_h=value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 2048 else 2,
    )
