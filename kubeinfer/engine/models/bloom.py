"""Bloom decoder (BloomForCausalLM).

What sets it apart from Llama, all explicit here: no rotary or learned positions but ALiBi (the
attention kernels add slope[h] * (key_pos - query_pos); Bloom's own slope * key_pos differs by a
constant per query row, which the softmax drops), a LayerNorm right after the token embedding,
LayerNorms with bias, a fused query_key_value matrix stored per head ([H, 3, D] rows, cut into q,
k and v at load time so tensor parallelism slices each), a tanh-GELU MLP with biases, an lm_head
tied to the embeddings, and `apply_residual_connection_post_layernorm` (the residual taken after
the norm instead of before).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.layers.activation import GELU
from kubeinfer.engine.layers.alibi import bloom_alibi_slopes, rank_slopes
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import LayerNorm
from kubeinfer.engine.models.fused_qkv import named_pieces, qkv_mapping, split_per_head
from kubeinfer.engine.models.stacked_weights import load_stacked_weights


class BloomAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.n_head
        self.head_dim = hidden // total_heads
        self.query_key_value = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads,
                                                 bias=True)
        self.num_heads = self.query_key_value.num_heads
        self.dense = RowParallelLinear(hidden, hidden, bias=True)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_heads,
                              alibi_slopes=rank_slopes(bloom_alibi_slopes(total_heads)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).chunk(3, dim=-1)
        return self.dense(self.attn(q, k, v))


class BloomMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        hidden = config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(hidden, 4 * hidden, bias=True)
        self.gelu_impl = GELU("tanh")  # bloom_gelu_forward: the tanh approximation
        self.dense_4h_to_h = RowParallelLinear(4 * hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.gelu_impl(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)
        self.mlp = BloomMLP(config)
        self.residual_after_norm = bool(config.apply_residual_connection_post_layernorm)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.residual_after_norm else hidden_states
        hidden_states = self.self_attention(normed) + residual
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_after_norm else hidden_states
        return self.mlp(normed) + residual


class BloomModel(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, eps)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.hidden_size, eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class BloomForCausalLM(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden]
    (positions are unused: ALiBi reads them from the attention metadata); compute_logits(hidden
    [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.lm_head.tie_to(self.transformer.word_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states).float()

    def _pieces(self, weights: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterable[tuple[str, torch.Tensor]]:
        heads, head_dim = self.config.n_head, self.config.hidden_size // self.config.n_head
        for name, tensor in weights:
            # The original bigscience checkpoints name the base model's tensors without a prefix.
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            if ".query_key_value." in name:
                yield from named_pieces(name, ".query_key_value.",
                                        split_per_head(name, tensor, heads, head_dim))
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in; returns the parameter names filled."""
        return load_stacked_weights(self, self._pieces(weights), qkv_mapping(".query_key_value."),
                                    skip=lambda name: name.startswith("lm_head."))
