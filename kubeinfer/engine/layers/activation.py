"""Gated activations, and the plain GELU of the GPT-2 / NeoX / Bloom / MPT / Falcon MLPs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.kernels import ops

# HF activation names -> torch's GELU approximation. gelu_new, gelu_fast, gelu_pytorch_tanh and
# Bloom's own bloom_gelu_forward are the same tanh formula (equal to float32 rounding).
_GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh",
                       "gelu_pytorch_tanh": "tanh"}


class SiluAndMul(nn.Module):
    """[T, 2N] = [gate | up] -> silu(gate) * up, [T, N]; the layout gate_up_proj produces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """[T, 2N] = [gate | up] -> gelu_tanh(gate) * up, [T, N]: Gemma's GeGLU (HF gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(x)


class GELU(nn.Module):
    """Elementwise GELU, exact (erf) or tanh-approximated; one torch op, so no kernel of our own."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def get_gelu(hidden_act: str, model: str) -> GELU:
    """The GELU a config's activation name means; ConfigError naming the model for any other."""
    if hidden_act not in _GELU_APPROXIMATION:
        raise ConfigError(f"activation {hidden_act!r} in config.json is not supported by the native "
                          f"{model} model; it supports {', '.join(_GELU_APPROXIMATION)}")
    return GELU(_GELU_APPROXIMATION[hidden_act])
