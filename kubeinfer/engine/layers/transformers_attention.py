"""Our paged `Attention` behind transformers' `AttentionInterface`, for the transformers backend.

A transformers model whose attention goes through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
calls `kubeinfer_attention_forward(module, q, k, v, mask, scaling=..., sliding_window=..., softcap=...)`
with q/k/v as [batch, heads, tokens, head_dim]. The engine runs the whole flattened step as batch 1
(the tokens of every request end to end), so the call maps one to one onto our paged attention, which
finds each request's tokens from the step's metadata (forward_context.py) and is causal by
construction: the mask transformers would build is not needed and not built.

Each transformers attention module gets one `Attention` as a real submodule (`attach_attention`), so the
model runner finds it with `isinstance(m, Attention)` and binds its KV cache like a native layer's.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.engine.layers.attention import Attention

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "kubeinfer"
_ATTR = "kubeinfer_attn"  # the name of our Attention under each transformers attention module
# Keyword arguments that change the attention result in ways our kernels do not implement.
_UNSUPPORTED_KWARGS = ("s_aux", "sinks")
_probing = False


@contextlib.contextmanager
def probe_shapes() -> Iterator[None]:
    """Within this block (a forward pass with no KV cache) each Attention takes its head counts and
    head size from the q/k/v its module really produces, in place of the guess made from attributes
    and config at build time (configs carry keys a model ignores, e.g. GQA keys on GPT-2)."""
    global _probing
    _probing = True
    try:
        yield
    finally:
        _probing = False


def is_attention_module(module: nn.Module) -> bool:
    """A transformers decoder layer's attention: every model the backend runs names its attention
    class *Attention and gives it the `layer_idx` it reads its cache slot by."""
    name = type(module).__name__
    return (hasattr(module, "layer_idx") and "Attention" in name and "Rotary" not in name
            and not isinstance(module, Attention))


def _shape(module: nn.Module, config: Any) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of one transformers attention module, from the module's own
    attributes where it has them (they follow the model's choices: GPT-BigCode's multi-query, per-model
    head_dim), else from the config. A guess: `probe_shapes` settles it once weights are loaded, and
    every call checks it."""
    num_heads = getattr(module, "num_heads", None) or config.num_attention_heads
    qk_head_dim = getattr(module, "qk_head_dim", None)
    if qk_head_dim:  # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): K/V expanded per head
        return num_heads, num_heads, qk_head_dim
    head_dim = (getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
                or config.hidden_size // num_heads)
    num_kv_heads = getattr(module, "num_key_value_heads", None)
    if not num_kv_heads:
        groups = getattr(module, "num_key_value_groups", None)
        num_kv_heads = (num_heads // groups if groups
                        else getattr(config, "num_key_value_heads", None) or num_heads)
    return num_heads, num_kv_heads, head_dim


def attach_attention(hf_model: nn.Module, config: Any) -> list[Attention]:
    """Give every attention module of `hf_model` its own `Attention` (in layer order) and return them."""
    layers: list[Attention] = []
    for module in hf_model.modules():
        if not is_attention_module(module):
            continue
        num_heads, num_kv_heads, head_dim = _shape(module, config)
        window = getattr(module, "sliding_window", None)
        attn = Attention(num_heads, head_dim, getattr(module, "scaling", None) or head_dim**-0.5,
                         num_kv_heads, sliding_window=window or None,
                         softcap=getattr(module, "attn_logit_softcapping", None) or None)
        setattr(module, _ATTR, attn)
        layers.append(attn)
    return layers


def kubeinfer_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None,
                                scaling: float | None = None, dropout: float = 0.0,
                                sliding_window: int | None = None, softcap: float | None = None,
                                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q [1, H, T, D], k [1, KVH, T, D], v [1, KVH, T, Dv]
    -> ([1, T, H, Dv], no weights). The mask is ignored: our kernels are causal per request."""
    attn: Attention | None = getattr(module, _ATTR, None)
    if attn is None:
        raise RuntimeError(f"{type(module).__name__} has no kubeinfer Attention; the transformers "
                           "backend attaches one to every attention module when it builds the model")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{type(module).__name__} passes `{name}` (attention sinks), which "
                               "kubeinfer's attention kernels do not implement")
    batch, num_heads, num_tokens, head_dim = query.shape
    num_kv_heads, v_head_dim = key.shape[1], value.shape[-1]
    if _probing:
        attn.num_heads, attn.num_kv_heads, attn.head_dim = num_heads, num_kv_heads, head_dim
    if batch != 1 or (num_heads, num_kv_heads, head_dim) != (attn.num_heads, attn.num_kv_heads,
                                                              attn.head_dim) or v_head_dim > head_dim:
        raise RuntimeError(
            f"{type(module).__name__} produced q {tuple(query.shape)}, k {tuple(key.shape)}, v "
            f"{tuple(value.shape)} but its KV cache was laid out for {attn.num_heads} heads, "
            f"{attn.num_kv_heads} KV heads of size {attn.head_dim} and batch 1; the transformers "
            "backend cannot run this model")
    # The call's values are what the model means (per-layer windows, Granite's attention multiplier);
    # they are the same on every step, so setting them keeps CUDA-graph replays valid.
    attn.scale = scaling if scaling is not None else head_dim**-0.5
    attn.sliding_window = sliding_window or None
    attn.softcap = softcap or None
    if v_head_dim < head_dim:
        # MLA's values are narrower than its keys; one cache layout holds both, so pad and cut back.
        value = F.pad(value, (0, head_dim - v_head_dim))
    q = query[0].transpose(0, 1).reshape(num_tokens, num_heads * head_dim)
    k = key[0].transpose(0, 1).reshape(num_tokens, num_kv_heads * head_dim)
    v = value[0].transpose(0, 1).reshape(num_tokens, num_kv_heads * head_dim)
    out = attn(q, k, v).view(num_tokens, num_heads, head_dim)[..., :v_head_dim]
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make `attn_implementation="kubeinfer"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kubeinfer_attention_forward)
