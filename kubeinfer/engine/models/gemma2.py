"""Gemma 2 decoder: Gemma (gemma.py) plus sandwich norms, soft-capping and alternating windows.

Its own differences, each explicit: four norms per layer (after attention and after the MLP as well
as before each), attention scores scaled by query_pre_attn_scalar ** -0.5 instead of
head_dim ** -0.5, attention scores soft-capped (cap * tanh(s / cap), in the attention kernel) and
final logits soft-capped, and layers alternating between a sliding window and full attention as
`layer_types` says. Gemma 3 (gemma3.py) reuses this layer with q/k norms and two rotary tables.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kubeinfer.engine.layers.norm import GemmaRMSNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.engine.models.gemma import (GemmaAttention, GemmaCausalLMBase, GemmaMLP, GemmaModel,
                                           check_causal, head_dim_of)


def layer_window(config: Any, layer_idx: int) -> int | None:
    """The sliding window of one layer: `sliding_window` on "sliding_attention" layers, none on
    "full_attention" ones (transformers fills layer_types in from the config's pattern)."""
    layer_types = getattr(config, "layer_types", None)
    if not config.sliding_window or layer_types is None:
        return None
    return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None


def query_scale(config: Any) -> float:
    return float(config.query_pre_attn_scalar) ** -0.5


class Gemma2DecoderLayer(nn.Module):
    """norm -> attention -> norm -> add -> norm -> MLP -> norm -> add.

    The residual stream rides along as in Llama so that each add is fused into the next norm:
    post_attention_layernorm has no add (the attention output is normed before the residual), and
    pre_feedforward_layernorm takes the residual add.
    """

    def __init__(self, config: Any, attention: GemmaAttention):
        super().__init__()
        self.self_attn = attention
        self.mlp = GemmaMLP(config, config.hidden_activation)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


def gemma2_attention(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> GemmaAttention:
    return GemmaAttention(config, rotary_emb, query_scale(config),
                          sliding_window=layer_window(config, layer_idx),
                          softcap=getattr(config, "attn_logit_softcapping", None))


class Gemma2ForCausalLM(GemmaCausalLMBase):
    def __init__(self, config: Any):
        check_causal(config)
        rotary_emb = get_rope(config, head_dim_of(config))
        layers = [Gemma2DecoderLayer(config, gemma2_attention(config, i, rotary_emb))
                  for i in range(config.num_hidden_layers)]
        super().__init__(config, GemmaModel(config, layers))
