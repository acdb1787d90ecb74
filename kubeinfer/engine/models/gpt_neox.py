"""GPT-NeoX decoder (GPTNeoXForCausalLM): Pythia, GPT-NeoX-20B, StableLM-alpha and the like.

What sets it apart from Llama, all explicit here: LayerNorms with bias, rotary on only the first
`rotary_pct` of each head (HF's partial_rotary_factor; the shared rotary layer leaves the rest
as is), a fused query_key_value matrix stored per head ([H, 3, D] rows, cut into q, k and v at load
time so tensor parallelism slices each), biases on every linear, a GELU MLP, an untied `embed_out`
by default, and the parallel residual (`use_parallel_residual`): x + attn(ln1(x)) + mlp(ln2(x))
instead of the sequential x' = x + attn(ln1(x)); x' + mlp(ln2(x')).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.layers.activation import get_gelu
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import LayerNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.engine.models.fused_qkv import named_pieces, qkv_mapping, split_per_head
from kubeinfer.engine.models.stacked_weights import load_stacked_weights

# Buffers that old NeoX checkpoints saved beside the weights (the causal mask and its fill value).
_STALE_BUFFERS = (".attention.bias", ".attention.masked_bias")


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", True))
        self.head_dim = hidden // total_heads
        self.query_key_value = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads,
                                                 bias=bias)
        self.num_heads = self.query_key_value.num_heads
        self.dense = RowParallelLinear(hidden, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_heads)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size,
                                                  bias=True)
        self.act = get_gelu(config.hidden_act, "GPT-NeoX")
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                               bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, rotary_emb)
        self.mlp = GPTNeoXMLP(config)
        self.use_parallel_residual = bool(config.use_parallel_residual)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_output = self.attention(positions, self.input_layernorm(hidden_states))
        if self.use_parallel_residual:
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states + attn_output + mlp_output
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = get_rope(config, config.hidden_size // config.num_attention_heads)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, rotary_emb)
                                    for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_in(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.embed_out.tie_to(self.gpt_neox.embed_in)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.embed_out.compute_logits(hidden_states).float()

    def _pieces(self, weights: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterable[tuple[str, torch.Tensor]]:
        heads = self.config.num_attention_heads
        head_dim = self.config.hidden_size // heads
        for name, tensor in weights:
            if name.endswith(_STALE_BUFFERS):
                continue
            if ".query_key_value." in name:
                yield from named_pieces(name, ".query_key_value.",
                                        split_per_head(name, tensor, heads, head_dim))
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in; returns the parameter names filled."""
        tied = self.tie_word_embeddings
        return load_stacked_weights(self, self._pieces(weights), qkv_mapping(".query_key_value."),
                                    skip=lambda name: tied and name.startswith("embed_out."))
