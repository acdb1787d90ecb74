"""Gemma (the first generation) decoder, and the Gemma pieces Gemma 2 and Gemma 3 build on.

What sets Gemma apart from Llama, all explicit here: GeGLU (tanh-approximated GELU gate) instead of
SwiGLU, RMSNorm scaling by (1 + w), token embeddings multiplied by sqrt(hidden) (rounded to the
model dtype, as HF does), lm_head always tied to the embeddings, and an explicit head_dim (256 on
the 7B, which is not hidden / heads). Gemma 2 and 3 (gemma2.py, gemma3.py) add sandwich norms,
soft-capping, sliding-window layers and a query scale of their own; they reuse the MLP, the
attention block and the model-level parts below.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.activation import GeluTanhAndMul
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import GemmaRMSNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.engine.models.stacked_weights import STACKED_QKV_GATE_UP, load_stacked_weights

# HF names of the tanh-approximated GELU (gelu_new computes the same function); Gemma configs
# that say "gelu" are turned into gelu_pytorch_tanh by transformers itself.
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new")


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class GemmaMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, config: Any, hidden_act: str):
        super().__init__()
        if hidden_act not in GELU_TANH_NAMES:
            raise ConfigError(f"hidden activation {hidden_act!r} in config.json is not supported by the "
                              f"native Gemma models; they support {', '.join(GELU_TANH_NAMES)}")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter])
        self.down_proj = RowParallelLinear(inter, config.hidden_size)
        self.act_fn = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaAttention(nn.Module):
    """q/k/v in one matmul, rotary, paged attention, o_proj. What varies between the Gemma
    generations is passed in: the score scale, the layer's window and the score soft-cap."""

    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias=bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_kv_heads,
                              sliding_window=sliding_window, softcap=softcap)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(hidden_states)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class GemmaDecoderLayer(nn.Module):
    """Pre-norm block as in Llama (norm, attention, add, norm, MLP, add), with Gemma's norm and MLP."""

    def __init__(self, config: Any, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = GemmaAttention(config, rotary_emb, head_dim_of(config) ** -0.5)
        self.mlp = GemmaMLP(config, config.hidden_act)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class GemmaModel(nn.Module):
    """Scaled embedding -> layers -> final norm. `layers` is built by the caller, which is where
    the generations differ."""

    def __init__(self, config: Any, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # HF multiplies by sqrt(hidden) rounded to the model dtype (33.94 -> 34.0 in bf16): a buffer
        # made under the loader's default dtype holds that same rounded value.
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (a vision-language model's merged embeddings) come scaled already."""
        hidden_states = (self.embed_tokens(input_ids) * self.normalizer if inputs_embeds is None
                         else inputs_embeds)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def check_causal(config: Any) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ConfigError("this Gemma config sets use_bidirectional_attention (an embedding model); "
                          "kubeinfer's native Gemma models generate text with causal attention only")


class GemmaCausalLMBase(nn.Module):
    """The model runner's interface for every Gemma generation: forward(input_ids [T], positions
    [T]) -> hidden [T, hidden]; compute_logits(hidden [N, hidden]) -> float32 logits [N, vocab],
    soft-capped when the config says so (Gemma 2); load_weights(HF names)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}
    stacked_params_mapping = STACKED_QKV_GATE_UP

    def __init__(self, config: Any, model: GemmaModel):
        super().__init__()
        self.config = config
        self.model = model
        # Gemma checkpoints store no lm_head: it is always the embedding matrix.
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.lm_head.tie_to(self.model.embed_tokens)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled token embeddings forward starts from (what inputs_embeds replaces)."""
        return self.model.embed_tokens(input_ids) * self.model.normalizer

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden_states).float()
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in; returns the parameter names filled."""
        return load_stacked_weights(self, weights, self.stacked_params_mapping,
                                    skip=lambda name: name.startswith("lm_head."))


class GemmaForCausalLM(GemmaCausalLMBase):
    def __init__(self, config: Any):
        check_causal(config)
        rotary_emb = get_rope(config, head_dim_of(config))
        layers = [GemmaDecoderLayer(config, rotary_emb) for _ in range(config.num_hidden_layers)]
        super().__init__(config, GemmaModel(config, layers))
