"""Gated activations."""
from __future__ import annotations

import torch
from torch import nn

from kubeinfer.kernels import ops


class SiluAndMul(nn.Module):
    """[T, 2N] = [gate | up] -> silu(gate) * up, [T, N]; the layout gate_up_proj produces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """[T, 2N] = [gate | up] -> gelu_tanh(gate) * up, [T, N]: Gemma's GeGLU (HF gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(x)
