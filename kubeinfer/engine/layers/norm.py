"""RMSNorm over the last dimension, optionally fused with the residual add; Gemma's (1 + w) variant;
LayerNorm (with or without bias) for the GPT-2 / NeoX / Bloom / MPT / Falcon families."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, N] -> normed x; with a residual, returns (norm(x + residual), x + residual), which
        lets the decoder layer carry the un-normed sum to the next layer without an extra kernel."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm scales by (1 + w), with w stored in the checkpoint (zeros = identity).

    The loader stores 1 + w (added in float32), so the forward is the plain fused kernel. HF
    multiplies by (1 + w) in float32 before rounding, the kernel rounds the normed x first and then
    multiplies in the model dtype: identical in float32, within one rounding in bf16/fp16.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = self.weight_loader

    @staticmethod
    def weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if tuple(loaded_weight.shape) != tuple(param.shape):
            raise ValueError(f"checkpoint norm weight of shape {tuple(loaded_weight.shape)} does not fit "
                             f"{tuple(param.shape)}; is the config.json the one this checkpoint was "
                             "saved with?")
        param.data.copy_(loaded_weight.float() + 1.0)


class LayerNorm(nn.Module):
    """torch's LayerNorm (one fused op on every device), with RMSNorm's residual contract so the
    decoder layers of both kinds read alike. bias=False is MPT's bias-free norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, N] -> normed x; with a residual, returns (norm(x + residual), x + residual)."""
        if residual is not None:
            residual = x + residual
            return F.layer_norm(residual, self.weight.shape, self.weight, self.bias, self.eps), residual
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"
