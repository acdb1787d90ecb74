"""Neox-style rotary embedding in Triton (HF's rotate_half), with partial rotary_dim: the decoder's
rotary (a row of the cos/sin table per position) and the vision towers' (Qwen2-VL: a row per
token, no positions, float32 math).

Same contract as `reference.rotary_embedding`: returns new (q, k); the features past rotary_dim
are copied through. Rounding follows the reference op by op. Default (the decoders, HF's
apply_rotary_pos_emb): cos/sin are rounded to q's dtype, x * cos and rotate_half(x) * sin are each
rounded to the output dtype, then their sum is. FLOAT32_MATH (HF's apply_rotary_pos_emb_vision):
x, cos and sin in float32, both products and their sum in float32, one rounding at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(out_ptr, x_ptr, stride_o_h, stride_x_h, cos, sin, partner, sign, is_rot,
                  NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, FLOAT32_MATH: tl.constexpr):
    # out_ptr / x_ptr point at one token's [NUM_HEADS, HEAD_SIZE] rows.
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_SIZE)
    x = tl.load(x_ptr + offs_h[:, None] * stride_x_h + offs_d[None, :], mask=mask, other=0.0)
    # The rotate_half partner of feature d (d +- rotary_dim/2); same cache lines, an L1 hit.
    xp = tl.load(x_ptr + offs_h[:, None] * stride_x_h + partner[None, :],
                 mask=mask & is_rot[None, :], other=0.0)
    dtype = out_ptr.dtype.element_ty
    if FLOAT32_MATH:  # each product and the sum rounded to float32 only (no FMA: see the launch)
        a = x.to(tl.float32) * cos[None, :]
        b = xp.to(tl.float32) * sign[None, :] * sin[None, :]
    else:
        a = (x.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32)
        b = (xp.to(tl.float32) * sign[None, :] * sin[None, :]).to(dtype).to(tl.float32)
    out = tl.where(is_rot[None, :], (a + b).to(dtype), x.to(dtype))
    tl.store(out_ptr + offs_h[:, None] * stride_o_h + offs_d[None, :], out, mask=mask)


@triton.jit
def _rotary_kernel(
    q_out_ptr,  # [T, H, D]
    k_out_ptr,  # [T, KVH, D]
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, KVH, D]
    positions_ptr,  # [T] int (HAS_POSITIONS only)
    cos_sin_ptr,  # [max_pos, ROT_DIM] float32: cos | sin; [T, ROT_DIM] without positions
    stride_q_t, stride_q_h, stride_k_t, stride_k_h,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h,
    stride_cs,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    ROT_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of 2 of NUM_HEADS
    BLOCK_KVH: tl.constexpr,  # next power of 2 of NUM_KV_HEADS
    BLOCK_D: tl.constexpr,  # next power of 2 of HEAD_SIZE
    HAS_POSITIONS: tl.constexpr,  # False: token t reads table row t
    FLOAT32_MATH: tl.constexpr,  # True: cos/sin and the products stay float32 (vision towers)
):
    token = tl.program_id(0).to(tl.int64)
    if HAS_POSITIONS:
        pos = tl.load(positions_ptr + token).to(tl.int64)
    else:
        pos = token
    half: tl.constexpr = ROT_DIM // 2
    offs_d = tl.arange(0, BLOCK_D)
    is_rot = offs_d < ROT_DIM
    first_half = offs_d < half
    partner = tl.where(first_half, offs_d + half, offs_d - half)
    sign = tl.where(first_half, -1.0, 1.0)
    freq = tl.where(first_half, offs_d, offs_d - half)
    cs_row = cos_sin_ptr + pos * stride_cs
    # Loaded once per token for all heads of q and k; rounded to q's dtype as the reference does
    # (unless FLOAT32_MATH, where they are used as stored).
    cos = tl.load(cs_row + freq, mask=is_rot, other=1.0).to(tl.float32)
    sin = tl.load(cs_row + half + freq, mask=is_rot, other=0.0).to(tl.float32)
    if not FLOAT32_MATH:
        cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)
        sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_out_ptr + token * stride_qo_t, q_ptr + token * stride_q_t, stride_qo_h,
                  stride_q_h, cos, sin, partner, sign, is_rot,
                  NUM_HEADS, HEAD_SIZE, BLOCK_H, BLOCK_D, FLOAT32_MATH)
    _rotate_heads(k_out_ptr + token * stride_ko_t, k_ptr + token * stride_k_t, stride_ko_h,
                  stride_k_h, cos, sin, partner, sign, is_rot,
                  NUM_KV_HEADS, HEAD_SIZE, BLOCK_KVH, BLOCK_D, FLOAT32_MATH)


def rotary_embedding(positions: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, float32_math: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.rotary_embedding`: new (q, k) tensors. q and k may be strided
    views (of a fused QKV output): only their last dim must be contiguous."""
    num_tokens, num_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    rot_dim = cos_sin_cache.shape[1]
    assert rot_dim % 2 == 0 and rot_dim <= head_size
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    assert positions is not None or cos_sin_cache.shape[0] >= num_tokens
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, q.dtype), device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_h = triton.next_power_of_2(num_heads)
    block_d = triton.next_power_of_2(head_size)
    # Grid: one program per token rotates all its q and k heads, so the token's cos/sin row is
    # read once; a token's heads are a few KiB of contiguous work.
    _rotary_kernel[(num_tokens,)](
        q_out_ptr=q_out, k_out_ptr=k_out, q_ptr=q, k_ptr=k,
        positions_ptr=positions if positions is not None else cos_sin_cache,  # unread then
        cos_sin_ptr=cos_sin_cache,
        stride_q_t=q.stride(0), stride_q_h=q.stride(1),
        stride_k_t=k.stride(0), stride_k_h=k.stride(1),
        stride_qo_t=q_out.stride(0), stride_qo_h=q_out.stride(1),
        stride_ko_t=k_out.stride(0), stride_ko_h=k_out.stride(1),
        stride_cs=cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size, ROT_DIM=rot_dim,
        BLOCK_H=block_h, BLOCK_KVH=triton.next_power_of_2(num_kv_heads), BLOCK_D=block_d,
        HAS_POSITIONS=positions is not None, FLOAT32_MATH=float32_math,
        num_warps=min(8, max(1, block_h * block_d // 512)),
        # Without this LLVM narrows x*cos + rot*sin to one half-precision FMA, skipping the
        # reference's rounding of each product (seen with Triton 3.6 on H200: 1 ulp off in ~25%);
        # in FLOAT32_MATH a float32 FMA would likewise skip HF's rounding of x * cos.
        enable_fp_fusion=False,
    )
    return q_out, k_out
