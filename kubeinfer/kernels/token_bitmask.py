"""Structured outputs' token bitmask applied to logits, in Triton.

Same contract as `engine.structured_output.bitmask.apply_bitmask_reference`: for each bitmask row
i, the logits of row `rows[i]` whose bit is clear become -inf, in place; others are untouched.

Grid: (num_rows, cdiv(vocab_size, BLOCK_V)). One program owns BLOCK_V consecutive tokens of one
masked row: it reads the BLOCK_V / 32 words that cover them (each word is loaded by its 32 lanes;
the loads coalesce in L1), and stores -inf only where a bit is clear, so an all-allowed row costs
reads alone. BLOCK_V is a multiple of 32 so a block never splits a word.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,  # [num_tokens, V] float, masked in place
    bitmask_ptr,  # [num_rows, W] int32, W = cdiv(V, 32)
    rows_ptr,  # [num_rows] int32: the logits row of each bitmask row
    stride_logits, stride_bitmask,
    V,  # vocab size (logits width)
    BLOCK_V: tl.constexpr,
):
    mask_row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    logits_row = tl.load(rows_ptr + mask_row).to(tl.int64)
    offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < V
    words = tl.load(bitmask_ptr + mask_row * stride_bitmask + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + logits_row * stride_logits + offs, float("-inf"),
             mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor,
                        block_v: int = 1024) -> None:
    """Launch the kernel; arguments as in the module docstring (checked by the caller)."""
    num_rows, vocab_size = rows.numel(), logits.shape[1]
    if num_rows == 0:
        return
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1 and block_v % 32 == 0
    grid = (num_rows, triton.cdiv(vocab_size, block_v))
    _apply_token_bitmask_kernel[grid](
        logits_ptr=logits, bitmask_ptr=bitmask, rows_ptr=rows.contiguous(),
        stride_logits=logits.stride(0), stride_bitmask=bitmask.stride(0), V=vocab_size,
        BLOCK_V=block_v)
