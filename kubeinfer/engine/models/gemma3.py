"""Gemma 3 text decoder (Gemma3ForCausalLM): the Gemma 2 layer (gemma2.py) with two differences.

- q and k are RMS-normed per head ((1 + w) weights, like every Gemma norm) before rotary.
- RoPE is set per layer type: sliding-window ("local") layers use one theta (10k), full-attention
  ("global") layers another (1M) and, on the larger models, linear scaling; each type gets its
  own rotary table, shared by the layers of that type.

Attention soft-capping is gone from the released configs (attn_logit_softcapping is null), final
logit soft-capping is optional; both are honoured when a config sets them. The multimodal
Gemma3ForConditionalGeneration wraps this decoder (models/gemma_vlm.py).
"""
from __future__ import annotations

from typing import Any

import torch

from kubeinfer.engine.layers.norm import GemmaRMSNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.engine.models.gemma import (GemmaAttention, GemmaCausalLMBase, GemmaModel,
                                           check_causal, head_dim_of)
from kubeinfer.engine.models.gemma2 import Gemma2DecoderLayer, layer_window, query_scale


class Gemma3Attention(GemmaAttention):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, sliding_window: int | None):
        super().__init__(config, rotary_emb, query_scale(config), sliding_window=sliding_window,
                         softcap=getattr(config, "attn_logit_softcapping", None))
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(hidden_states)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class Gemma3ForCausalLM(GemmaCausalLMBase):
    def __init__(self, config: Any):
        check_causal(config)
        head_dim = head_dim_of(config)
        ropes = {t: get_rope(config, head_dim, layer_type=t) for t in sorted(set(config.layer_types))}
        layers = []
        for i in range(config.num_hidden_layers):
            attention = Gemma3Attention(config, ropes[config.layer_types[i]], layer_window(config, i))
            layers.append(Gemma2DecoderLayer(config, attention))
        super().__init__(config, GemmaModel(config, layers))
