"""The one place layers call kernels through: Triton on CUDA tensors, the torch reference elsewhere."""
from __future__ import annotations

from kubeinfer.kernels import reference

reshape_and_cache = reference.reshape_and_cache
unified_attention = reference.unified_attention
rms_norm = reference.rms_norm
fused_add_rms_norm = reference.fused_add_rms_norm
rotary_embedding = reference.rotary_embedding
silu_and_mul = reference.silu_and_mul
