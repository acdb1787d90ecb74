"""Falcon decoder (FalconForCausalLM): Falcon 7B/40B/180B, Falcon-RW (ALiBi), Falcon 2 11B.

The variants, each explicit here:
- The q/k/v layout of `query_key_value` and the number of KV heads: the new decoder architecture
  (40B, 180B) stores each KV group's query heads followed by its k and v (`num_kv_heads` groups);
  the old one is multi-query (7B: every query head, then one k and one v) or, without
  multi_query, each head's q, k, v side by side. All are cut into q, k and v at load time, so
  tensor parallelism slices each (a KV head is replicated where there are fewer than ranks).
- The block: parallel attention (x + attn(ln(x)) + mlp(ln(x))), with one LayerNorm, or two
  (`ln_attn`, `ln_mlp`) in the new architecture (`num_ln_in_parallel_attn`, 2 by default there);
  or the sequential block (x' = x + attn(ln(x)); x' + mlp(post_ln(x'))) when parallel_attn is off
  in the old architecture.
- Positions: rotary on the whole head, or ALiBi (`alibi`, Falcon-RW). HF adds the ALiBi bias before
  the 1/sqrt(head_dim) scale, so the slopes are scaled by it too, and it builds the bias from
  slopes rounded to bfloat16 (`build_alibi_tensor`), which is reproduced; HF then rounds each
  slope * key_pos to bfloat16, which a relative bias cannot reproduce, so contexts past 256 tokens
  may differ from HF by that rounding (slope * key_pos is exact in bf16 below that for the usual
  power-of-2 head counts). HF's eager attention adds the bias twice (in the logits and again in
  the mask); this follows its SDPA path (its default) and the original Falcon-RW code: once.
- `bias` on every linear or none; LayerNorms always with bias; an lm_head tied by default.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.activation import get_gelu
from kubeinfer.engine.layers.alibi import bloom_alibi_slopes, rank_slopes
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import LayerNorm
from kubeinfer.engine.layers.rotary import RotaryEmbedding, get_rope
from kubeinfer.engine.models.fused_qkv import (named_pieces, qkv_mapping, split_contiguous,
                                               split_grouped, split_per_head)
from kubeinfer.engine.models.stacked_weights import load_stacked_weights


def falcon_num_kv_heads(config: Any) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def falcon_alibi_slopes(config: Any) -> torch.Tensor:
    """HF's slopes as Falcon applies them: rounded to bf16, then scaled by 1/sqrt(head_dim)."""
    head_dim = config.hidden_size // config.num_attention_heads
    slopes = bloom_alibi_slopes(config.num_attention_heads).bfloat16().float()
    return slopes * head_dim ** -0.5


def num_layernorms(config: Any) -> int:
    """LayerNorms before the attention and MLP of a block: 2 in the new architecture unless
    num_ln_in_parallel_attn says 1; 1 in the old parallel block; 2 (input, post) when sequential."""
    if config.new_decoder_architecture:
        return getattr(config, "num_ln_in_parallel_attn", None) or 2
    return 1 if config.parallel_attn else 2


class FalconAttention(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding | None):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // total_heads
        self.query_key_value = QKVParallelLinear(hidden, self.head_dim, total_heads,
                                                 falcon_num_kv_heads(config), bias=config.bias)
        qkv = self.query_key_value
        self.num_heads, self.num_kv_heads = qkv.num_heads, qkv.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.dense = RowParallelLinear(hidden, hidden, bias=config.bias)
        self.rotary_emb = rotary_emb
        slopes = rank_slopes(falcon_alibi_slopes(config)) if config.alibi else None
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                              self.num_kv_heads, alibi_slopes=slopes)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).split(
            [self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v))


class FalconMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        inter = getattr(config, "ffn_hidden_size", None) or 4 * config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, inter, bias=config.bias)
        self.act = get_gelu(config.activation, "Falcon")
        self.dense_4h_to_h = RowParallelLinear(inter, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding | None):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.self_attention = FalconAttention(config, rotary_emb)
        self.mlp = FalconMLP(config)
        self.parallel = bool(config.new_decoder_architecture or config.parallel_attn)
        self.two_norms_parallel = self.parallel and num_layernorms(config) == 2
        if self.two_norms_parallel:
            self.ln_attn = LayerNorm(hidden, eps)
            self.ln_mlp = LayerNorm(hidden, eps)
        else:
            self.input_layernorm = LayerNorm(hidden, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.two_norms_parallel:
            attn_in, mlp_in = self.ln_attn(hidden_states), self.ln_mlp(hidden_states)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden_states)
        attn_output = self.self_attention(positions, attn_in)
        if self.parallel:
            return hidden_states + attn_output + self.mlp(mlp_in)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FalconModel(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary_emb = None if config.alibi else get_rope(config, head_dim)
        self.h = nn.ModuleList(FalconDecoderLayer(config, rotary_emb)
                               for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.word_embeddings(input_ids)
        for layer in self.h:
            hidden_states = layer(positions, hidden_states)
        return self.ln_f(hidden_states)


class FalconForCausalLM(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    def __init__(self, config: Any):
        super().__init__()
        if config.new_decoder_architecture and not config.parallel_attn:
            raise ConfigError("this Falcon config sets new_decoder_architecture with parallel_attn "
                              "false, a combination transformers cannot run either; set "
                              "parallel_attn true (every released new-architecture Falcon does)")
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.transformer.word_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states).float()

    def split_qkv(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        config = self.config
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        if config.new_decoder_architecture:
            return split_grouped(name, tensor, heads, config.num_kv_heads, head_dim)
        if config.multi_query:
            return split_contiguous(name, tensor, heads * head_dim, head_dim)
        return split_per_head(name, tensor, heads, head_dim)

    def _pieces(self, weights: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if ".query_key_value." in name:
                yield from named_pieces(name, ".query_key_value.", self.split_qkv(name, tensor))
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in; returns the parameter names filled."""
        tied = self.tie_word_embeddings
        return load_stacked_weights(self, self._pieces(weights), qkv_mapping(".query_key_value."),
                                    skip=lambda name: tied and name.startswith("lm_head."))
