"""ALiBi slopes: the per-head bias rate of attention with linear biases, as transformers computes it.

Bloom and MPT write the same ALiBi slopes in two different formulas (MPT's generalises the 8 to
`alibi_bias_max`); from 11 heads up they differ in float32 rounding, so each family gets its own
function computing them as its HF model does. Both return all heads' slopes in float32, and
`rank_slopes` cuts the heads this tensor-parallel rank holds (QKVParallelLinear gives rank r the
heads [r * H/tp, (r + 1) * H/tp)).

- Bloom and Falcon (HF `build_alibi_tensor`): 2^(-8/n) to the powers 1..n for the nearest power of
  2 n below H, then the odd powers of 2^(-4/n) for the remaining heads.
- MPT (HF `build_mpt_alibi_tensor`): 1 / 2^(k * max_bias / n2) for k = 1..n2, n2 the power of 2
  at or above H; with H < n2 the odd-indexed slopes come first, then the even ones, cut to H.
"""
from __future__ import annotations

import math

import torch

from kubeinfer.engine.layers.linear import tp_rank, tp_size


def bloom_alibi_slopes(num_heads: int) -> torch.Tensor:
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    pow2 = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, pow2 + 1, dtype=torch.int64).float() * (alibi_bias_max / pow2)
    slopes = 1.0 / torch.pow(2, base)
    if pow2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def rank_slopes(slopes: torch.Tensor) -> torch.Tensor:
    """The slopes of this rank's query heads, contiguous, on the default device (the loader builds
    the model under its target device)."""
    per_rank = len(slopes) // tp_size()
    mine = slopes[tp_rank() * per_rank:(tp_rank() + 1) * per_rank]
    return mine.contiguous().to(torch.get_default_device())
