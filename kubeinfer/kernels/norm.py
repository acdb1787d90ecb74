"""RMSNorm and fused residual-add + RMSNorm in Triton.

Same contracts as `reference.rms_norm` and `reference.fused_add_rms_norm`, including where values
are rounded: the residual sum is rounded to its dtype (x + residual in torch), the normalized
float32 row is rounded to the input's dtype BEFORE the weight multiplies it (as HF's LlamaRMSNorm
does), and the product is rounded to the promoted output dtype. Each rounding is a cast through
the destination pointer's element type, so mixed dtypes follow torch's promotion.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [T, N] promote(weight, normed) dtype
    residual_out_ptr,  # [T, N] promote(x, residual) dtype (HAS_RESIDUAL only)
    x_ptr,  # [T, N]
    residual_ptr,  # [T, N] (HAS_RESIDUAL only)
    weight_ptr,  # [N]
    eps,  # float32
    stride_x, stride_r, stride_o, stride_ro,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of 2 of N: a whole row per program
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    if HAS_RESIDUAL:
        normed = (x * rstd).to(residual_out_ptr.dtype.element_ty).to(tl.float32)
    else:
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        sum_dtype = torch.promote_types(x.dtype, residual.dtype)
        residual_out = torch.empty(x2.shape, dtype=sum_dtype, device=x.device)
    else:
        r2 = residual_out = x2  # unused
        sum_dtype = x.dtype
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, sum_dtype),
                      device=x.device)
    block_n = triton.next_power_of_2(n)
    # Grid: one program per row. The mean of squares needs the whole row, and a row of a hidden
    # size (<= 16K) fits in registers, so each row is read once; T rows fill the GPU.
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            out_ptr=out, residual_out_ptr=residual_out, x_ptr=x2, residual_ptr=r2,
            weight_ptr=weight.contiguous(), eps=eps,
            stride_x=x2.stride(0), stride_r=r2.stride(0), stride_o=out.stride(0),
            stride_ro=residual_out.stride(0),
            N=n, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block_n // 512)),
        )
    out = out.view(*x.shape[:-1], n)
    if residual is None:
        return out, None
    return out, residual_out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of `reference.rms_norm`."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.fused_add_rms_norm`: (rms_norm(x + residual), x + residual).
    New tensors; the inputs are left untouched, as in the reference."""
    return _launch(x, residual, weight, eps)
