"""MPT decoder (MptForCausalLM; mosaicml's remote-code MPTForCausalLM has the same tensors).

What sets it apart, all explicit here: ALiBi with slopes computed by MPT's formula
(`alibi_bias_max`; layers/alibi.py), no positions otherwise, bias-free LayerNorms and linears
(`no_bias`, true in every released checkpoint), a contiguous [q | k | v] `Wqkv` whose output may be clamped to +-`clip_qkv` before the
heads are split, an optional `softmax_scale`, an exact-GELU MLP of `expansion_ratio` x d_model, and
an lm_head tied to the embeddings. MPT's learned-position variant (alibi false) and q/k LayerNorm
(`qk_ln`) are refused: transformers implements neither, so their tokens could not be checked.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.activation import GELU
from kubeinfer.engine.layers.alibi import mpt_alibi_slopes, rank_slopes
from kubeinfer.engine.layers.attention import Attention
from kubeinfer.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kubeinfer.engine.layers.linear import (ColumnParallelLinear, QKVParallelLinear,
                                            RowParallelLinear)
from kubeinfer.engine.layers.norm import LayerNorm
from kubeinfer.engine.models.fused_qkv import named_pieces, qkv_mapping, split_contiguous
from kubeinfer.engine.models.stacked_weights import load_stacked_weights


def attn_setting(config: Any, key: str, default: Any = None) -> Any:
    """One attn_config entry: an MptAttentionConfig in transformers, a dict in remote-code configs."""
    attn_config = getattr(config, "attn_config", None) or {}
    if isinstance(attn_config, dict):
        return attn_config.get(key, default)
    return getattr(attn_config, key, default)


def check_mpt_config(config: Any) -> None:
    if not attn_setting(config, "alibi", True):
        raise ConfigError("this MPT config has attn_config.alibi false (learned positions), which "
                          "kubeinfer's native MPT does not run; only ALiBi MPT models are supported")
    if attn_setting(config, "qk_ln", False):
        raise ConfigError("this MPT config sets attn_config.qk_ln, which kubeinfer's native MPT does "
                          "not run (transformers does not implement it either)")


class MptAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        hidden, total_heads = config.d_model, config.n_heads
        bias = not config.no_bias
        self.head_dim = hidden // total_heads
        self.Wqkv = QKVParallelLinear(hidden, self.head_dim, total_heads, total_heads, bias=bias)
        self.num_heads = self.Wqkv.num_heads
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias)
        self.clip_qkv = attn_setting(config, "clip_qkv")
        scale = attn_setting(config, "softmax_scale") or self.head_dim ** -0.5
        slopes = mpt_alibi_slopes(total_heads, float(attn_setting(config, "alibi_bias_max", 8)))
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_heads,
                              alibi_slopes=rank_slopes(slopes))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class MptMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        hidden, bias = config.d_model, not config.no_bias
        inter = int(getattr(config, "expansion_ratio", 4) * hidden)
        self.up_proj = ColumnParallelLinear(hidden, inter, bias=bias)
        self.act = GELU("none")
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MptBlock(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        eps, bias = config.layer_norm_epsilon, not config.no_bias
        self.norm_1 = LayerNorm(config.d_model, eps, bias=bias)
        self.attn = MptAttention(config)
        self.norm_2 = LayerNorm(config.d_model, eps, bias=bias)
        self.ffn = MptMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm_1(hidden_states))
        return hidden_states + self.ffn(self.norm_2(hidden_states))


class MptModel(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MptBlock(config) for _ in range(config.n_layers))
        self.norm_f = LayerNorm(config.d_model, config.layer_norm_epsilon, bias=not config.no_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.norm_f(hidden_states)


class MptForCausalLM(nn.Module):
    """The model runner's interface: forward(input_ids [T], positions [T]) -> hidden [T, hidden]
    (positions are unused: ALiBi reads them from the attention metadata); compute_logits(hidden
    [N, hidden]) -> float32 logits [N, vocab]; load_weights(HF names)."""

    def __init__(self, config: Any):
        super().__init__()
        check_mpt_config(config)
        self.config = config
        self.transformer = MptModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.d_model)
        self.lm_head.tie_to(self.transformer.wte)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states).float()

    def _pieces(self, weights: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterable[tuple[str, torch.Tensor]]:
        rows = self.config.d_model
        for name, tensor in weights:
            if ".Wqkv." in name:
                yield from named_pieces(name, ".Wqkv.", split_contiguous(name, tensor, rows, rows))
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors in; returns the parameter names filled."""
        return load_stacked_weights(self, self._pieces(weights), qkv_mapping(".Wqkv."),
                                    skip=lambda name: name.startswith("lm_head."))
