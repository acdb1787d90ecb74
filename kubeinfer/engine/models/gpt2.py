"""GPT-2 decoder (GPT2LMHeadModel), and the GPT-2 block GPTBigCode (gpt_bigcode.py) builds on.

What sets it apart from Llama, all explicit here: learned absolute positions (`wpe`, added to the
token embeddings; no rotary), pre-norm blocks with biased LayerNorms, biases on every linear, a
tanh-GELU MLP of `n_inner` (4 x hidden by default), an lm_head tied to the embeddings, and
checkpoints written by HF's Conv1D, whose weights are [in, out]: they are transposed once at load
time. The score scale is 1/sqrt(head_dim) (or 1 without `scale_attn_weights`), further divided by
layer_idx + 1 with `scale_attn_by_inverse_layer_idx`. `c_attn` holds [q | k | v] contiguously.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.layers.activation import get_gelu
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import (ParallelLMHead, PositionEmbedding,
                                               VocabParallelEmbedding)
from kubeinfer.engine.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import LayerNorm
from kubeinfer.engine.models.fused_qkv import named_pieces, qkv_mapping, split_contiguous
from kubeinfer.engine.models.stacked_weights import load_stacked_weights

# Buffers that old GPT-2 checkpoints saved beside the weights (the causal mask and its fill value).
_STALE_BUFFERS = (".attn.bias", ".attn.masked_bias")


def attention_scale(config: Any, layer_idx: int) -> float:
    head_dim = config.hidden_size // config.num_attention_heads
    scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer_idx + 1)
    return scale


class GPT2Attention(nn.Module):
    """c_attn -> paged attention -> c_proj; `num_kv_heads` is 1 for GPTBigCode's multi-query."""

    def __init__(self, config: Any, layer_idx: int, num_kv_heads: int):
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // total_heads
        self.c_attn = QKVParallelLinear(hidden, self.head_dim, total_heads, num_kv_heads, bias=True)
        self.num_heads, self.num_kv_heads = self.c_attn.num_heads, self.c_attn.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.attn = Attention(self.num_heads, self.head_dim, attention_scale(config, layer_idx),
                              self.num_kv_heads)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config: Any, model: str):
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.act = get_gelu(config.activation_function, model)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int, num_kv_heads: int, model: str):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps)
        self.attn = GPT2Attention(config, layer_idx, num_kv_heads)
        self.ln_2 = LayerNorm(config.hidden_size, eps)
        self.mlp = GPT2MLP(config, model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config: Any, num_kv_heads: int, model: str):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = PositionEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, num_kv_heads, model)
                               for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    model_name = "GPT-2"

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, self.num_kv_heads(config), self.model_name)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.lm_head.tie_to(self.transformer.wte)

    @staticmethod
    def num_kv_heads(config: Any) -> int:
        return config.num_attention_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states).float()

    def split_qkv(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = self.config.hidden_size
        return split_contiguous(name, tensor, rows, rows)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """HF's Conv1D stores [in, out]: every 2-D weight of a block's linears is transposed."""
        is_conv1d = ".h." in name and name.endswith(".weight") and tensor.dim() == 2
        return tensor.t() if is_conv1d else tensor

    def _pieces(self, weights: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            # The original openai checkpoints name the base model's tensors without a prefix.
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
            if name.endswith(_STALE_BUFFERS):
                continue
            tensor = self.checkpoint_tensor(name, tensor)
            if ".c_attn." in name:
                yield from named_pieces(name, ".c_attn.", self.split_qkv(name, tensor))
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in; returns the parameter names filled."""
        return load_stacked_weights(self, self._pieces(weights), qkv_mapping(".c_attn."),
                                    skip=lambda name: name.startswith("lm_head."))
