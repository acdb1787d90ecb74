"""Rotary position embedding with a precomputed cos/sin table.

Frequencies and the attention scaling of every scaled RoPE variant come from transformers'
`ROPE_INIT_FUNCTIONS`, so llama3, linear, dynamic and yarn scaling match HF bit for bit instead of
being re-derived here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.kernels import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _is_per_layer_type(params: dict) -> bool:
    return bool(params) and all(isinstance(v, dict) for v in params.values())


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict:
    """The config's RoPE settings as one flat dict with at least rope_type and rope_theta.

    transformers 5 keeps them in `rope_parameters`; 4.x in `rope_scaling` plus `rope_theta`. Configs
    with settings per layer type (Gemma 3: {"sliding_attention": {...}, "full_attention": {...}})
    need `layer_type`.
    """
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    if _is_per_layer_type(params):
        if layer_type not in params:
            raise ConfigError(f"config.json sets RoPE per layer type ({', '.join(sorted(params))}); "
                              f"this model asked for {layer_type!r}. Serve it with its native model "
                              "class (e.g. Gemma3ForCausalLM), which builds one rotary table per type.")
        params = dict(params[layer_type])
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def scaled_max_position(hf_config: Any, max_position: int) -> int:
    """How far positions may go once the config's RoPE scaling stretches `max_position`.

    linear and yarn extend the trained length by `factor` (vLLM's rule); llama3 configs already state
    the extended length; dynamic stays at the trained length because beyond it HF recomputes the
    frequencies per sequence length, which one static table cannot reproduce. Per-layer-type
    settings (Gemma 3) already state the extended length too.
    """
    raw = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if _is_per_layer_type(dict(raw or {})):
        return max_position
    params = rope_parameters(hf_config)
    factor = float(params.get("factor") or 1.0)
    if params["rope_type"] == "linear":
        return int(max_position * factor)
    if params["rope_type"] == "yarn":
        original = params.get("original_max_position_embeddings") or max_position
        return max(max_position, int(original * factor))
    return max_position


def _inv_freq_and_scaling(hf_config: Any, head_dim: int,
                          layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"RoPE type {rope_type!r} in config.json is not supported; kubeinfer "
                          f"supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        return 1.0 / (float(params["rope_theta"]) ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # HF's init functions read head_dim from the config; models like Qwen3 state it explicitly.
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float().cpu(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary on the first `rotary_dim` features of each head.

    cos_sin_cache [max_position, rotary_dim] float32 = cat(cos, sin), each [max_position, rotary_dim/2],
    already multiplied by the attention scaling (yarn's mscale), as HF applies it to cos and sin.
    """

    def __init__(self, head_size: int, inv_freq: torch.Tensor, max_position: int,
                 attention_scaling: float = 1.0):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = 2 * inv_freq.shape[0]
        self.max_position = max_position
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq.float().cpu())
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling
        # A buffer so model.to(device) moves it; built in float32 on CPU so a default dtype of bf16 or
        # a meta default device never touches it.
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H*D] or [T, H, D]; k likewise with KVH heads. Returns (q, k) shaped
        as given."""
        q_shape, k_shape = q.shape, k.shape
        q = q.view(q.shape[0], -1, self.head_size)
        k = k.view(k.shape[0], -1, self.head_size)
        q, k = ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        return q.reshape(q_shape), k.reshape(k_shape)

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_position={self.max_position}"


def get_rope(hf_config: Any, head_size: int, max_position: int | None = None,
             layer_type: str | None = None) -> RotaryEmbedding:
    """The model's rotary embedding (of one layer type, for configs that set RoPE per type);
    `max_position` defaults to the scaled max_position_embeddings."""
    if max_position is None:
        max_position = scaled_max_position(hf_config, hf_config.max_position_embeddings)
    inv_freq, scaling = _inv_freq_and_scaling(hf_config, head_size, layer_type)
    return RotaryEmbedding(head_size, inv_freq, max_position, scaling)
