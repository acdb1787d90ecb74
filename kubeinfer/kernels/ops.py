"""The one place layers call kernels through: Triton on CUDA tensors, the torch reference elsewhere.

Backend choice, from the environment variable KUBEINFER_KERNELS (read here and nowhere else, once,
at import):

- ``auto`` (default): Triton when the op's main tensor is on CUDA and triton imports; otherwise
  the torch reference (CPU machines, or a CUDA machine without triton).
- ``triton``: always Triton. On a machine without a GPU this needs ``TRITON_INTERPRET=1`` as well
  (slow; for tests).
- ``torch``: always the reference (for debugging numerics).

The Triton modules are imported on first use, so importing this module never imports triton and
works where triton is not installed.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from kubeinfer.kernels import moe_reference, reference

BACKENDS = ("auto", "triton", "torch")
backend = os.environ.get("KUBEINFER_KERNELS", "auto").strip().lower() or "auto"
if backend not in BACKENDS:
    raise ValueError(f"KUBEINFER_KERNELS={backend!r} is not one of {', '.join(BACKENDS)}; "
                     "unset it to pick Triton on CUDA tensors and torch elsewhere")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its driver
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on tensor `x` runs its Triton kernel under the current `backend`."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("KUBEINFER_KERNELS=triton but triton cannot be imported; "
                               "install triton or unset KUBEINFER_KERNELS")
        return True
    return x.is_cuda and triton_available()


@functools.cache
def _triton_module(name: str):
    return importlib.import_module(f"kubeinfer.kernels.{name}")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    impl = _triton_module("cache") if use_triton(key_cache) else reference
    return impl.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, max_query_len: int, max_seq_len: int,
                      scale: float, sliding_window: int | None = None,
                      softcap: float | None = None, out: torch.Tensor | None = None,
                      alibi_slopes: torch.Tensor | None = None,
                      span_lo: torch.Tensor | None = None, span_hi: torch.Tensor | None = None,
                      span_over_window: bool = False) -> torch.Tensor:
    impl = _triton_module("attention") if use_triton(q) else reference
    return impl.unified_attention(q, key_cache, value_cache, query_start_loc, seq_lens,
                                  block_tables, max_query_len, max_seq_len, scale,
                                  sliding_window=sliding_window, softcap=softcap, out=out,
                                  alibi_slopes=alibi_slopes, span_lo=span_lo, span_hi=span_hi,
                                  span_over_window=span_over_window)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    impl = _triton_module("norm") if use_triton(x) else reference
    return impl.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _triton_module("norm") if use_triton(x) else reference
    return impl.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, float32_math: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions None: token t uses table row t; float32_math: HF's vision rotary (see
    reference.rotary_embedding)."""
    impl = _triton_module("rotary") if use_triton(q) else reference
    return impl.rotary_embedding(positions, q, k, cos_sin_cache, float32_math=float32_math)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    impl = _triton_module("activation") if use_triton(x) else reference
    return impl.silu_and_mul(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    impl = _triton_module("activation") if use_triton(x) else reference
    return impl.gelu_tanh_and_mul(x)


def moe_topk(router_logits: torch.Tensor, top_k: int,
             renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _triton_module("moe") if use_triton(router_logits) else moe_reference
    return impl.moe_topk(router_logits, top_k, renormalize)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    impl = _triton_module("moe") if use_triton(x) else moe_reference
    return impl.fused_experts(x, w13, w2, topk_weights, topk_ids)
