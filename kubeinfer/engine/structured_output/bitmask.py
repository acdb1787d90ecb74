"""The step's token bitmask: filled on the CPU per constrained request, applied to the logits.

Layout (xgrammar's): int32 `[num_rows, ceil(vocab_size / 32)]`; token t is allowed in a row when
bit `t % 32` of word `t // 32` is set. -1 (all bits) allows everything.

Per step, on the driver only (only it samples, also under tensor parallelism):
1. the runner launches the forward pass;
2. meanwhile `fill_bitmask(matchers, bitmask)` writes one row per constrained request, on the CPU
   (xgrammar's C++ releases the GIL), into a pinned buffer from `allocate_bitmask`;
3. `apply_bitmask(logits, bitmask.to(device, non_blocking=True), rows)` sets the disallowed logits
   to -inf in place, before penalties, temperature and sampling; `rows[i]` is the logits row of
   the request whose matcher filled bitmask row i (with n > 1, each sample its own row).
On CUDA tensors this is a Triton kernel (kubeinfer/kernels/token_bitmask.py); elsewhere the torch
reference below.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kubeinfer.kernels import ops

BITS = 32


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + BITS - 1) // BITS


def allocate_bitmask(num_rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """An all-allowed CPU bitmask; pinned (for a non-blocking copy to the GPU) when asked."""
    mask = torch.full((num_rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)
    return mask.pin_memory() if pin_memory and torch.cuda.is_available() else mask


def fill_bitmask(matchers: Sequence, bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` <- the allowed next tokens of `matchers[i]` (StructuredOutputMatchers)."""
    if bitmask.shape[0] < len(matchers):
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(matchers)} matchers")
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask_row(bitmask, row)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | Sequence[int]
                  ) -> None:
    """In place: `logits[rows[i], t] = -inf` where bitmask row i disallows token t.

    Args:
        logits: [num_tokens, vocab_size] float (vocab_size <= 32 * bitmask width).
        bitmask: [len(rows), ceil(vocab_size / 32)] int32, on the logits' device.
        rows: the logits row of each bitmask row.
    """
    rows = torch.as_tensor(rows, dtype=torch.int32, device=logits.device)
    _check(logits, bitmask, rows)
    if rows.numel() == 0:
        return
    if ops.use_triton(logits):
        from kubeinfer.kernels.token_bitmask import apply_token_bitmask

        apply_token_bitmask(logits, bitmask, rows)
    else:
        apply_bitmask_reference(logits, bitmask, rows)


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """The torch path of apply_bitmask (and the Triton kernel's reference)."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1])
    index = rows.long()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool, True where allowed."""
    shifts = torch.arange(BITS, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], bitmask.shape[1] * BITS)[:, :vocab_size].bool()


def _check(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"want logits [tokens, vocab] and an int32 bitmask [rows, words]; got "
                         f"{tuple(logits.shape)} and {tuple(bitmask.shape)} {bitmask.dtype}")
    if bitmask.shape[0] != rows.numel():
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows but {rows.numel()} logits rows given")
    if bitmask.shape[1] * BITS < logits.shape[1]:
        raise ValueError(f"bitmask covers {bitmask.shape[1] * BITS} tokens, logits have "
                         f"{logits.shape[1]}")
    if bitmask.device != logits.device:
        raise ValueError(f"bitmask is on {bitmask.device}, logits on {logits.device}")
