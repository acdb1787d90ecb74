"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Both are the Qwen decoder (Qwen2: q/k/v bias; Qwen3: per-head q/k RMSNorm) with sparse MLPs:
softmax over `num_experts` router logits, top `num_experts_per_tok`, renormalised only when
`norm_topk_prob`. Qwen2-MoE adds a shared expert, a dense SiLU MLP every token passes through,
scaled by sigmoid(shared_expert_gate(x)) and added to the routed experts' sum. Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP.

Under tensor parallelism the shared expert is split like the routed ones and both partial sums
meet in a single all-reduce.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kubeinfer.engine.layers.linear import ReplicatedLinear, tp_all_reduce
from kubeinfer.engine.layers.moe import FusedMoE
from kubeinfer.engine.models.llama import LlamaMLP
from kubeinfer.engine.models.mixtral import SparseMoEForCausalLM, check_moe_config


def _num_experts(config: Any) -> int:
    # transformers 5 maps Qwen3-MoE's num_experts onto num_local_experts; older configs have only
    # num_experts.
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0) or 0


def _is_sparse_layer(config: Any, layer_idx: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and _num_experts(config) > 0 and (layer_idx + 1) % step == 0)


class QwenMoeSparseMoeBlock(nn.Module):
    """Routed experts plus, when `shared_expert_intermediate_size` is set (Qwen2-MoE), the gated
    shared expert."""

    def __init__(self, config: Any):
        super().__init__()
        num_experts = _num_experts(config)
        check_moe_config(config, num_experts)
        shared_size = getattr(config, "shared_expert_intermediate_size", 0) or 0
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size,
                                renormalize=bool(getattr(config, "norm_topk_prob", False)),
                                reduce_results=not shared_size)
        if shared_size:
            self.shared_expert = LlamaMLP(config, shared_size, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)
        else:
            self.shared_expert = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden_states, self.gate(hidden_states))
        if self.shared_expert is None:
            return out
        # The gate is a per-token scalar, so scaling this rank's partial sum commutes with the
        # all-reduce.
        gate = torch.sigmoid(self.shared_expert_gate(hidden_states))
        shared = gate * self.shared_expert(hidden_states)
        return tp_all_reduce(out + shared)


class _QwenMoeForCausalLM(SparseMoEForCausalLM):
    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if _is_sparse_layer(config, layer_idx):
            return QwenMoeSparseMoeBlock(config)
        return LlamaMLP(config)


class Qwen2MoeForCausalLM(_QwenMoeForCausalLM):
    @property
    def qkv_bias_always(self) -> bool:
        # Qwen2-MoE configs carry `qkv_bias` (true unless stated), not attention_bias.
        return bool(getattr(self.config, "qkv_bias", True))


class Qwen3MoeForCausalLM(_QwenMoeForCausalLM):
    qk_norm = True
