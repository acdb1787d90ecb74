"""Mixtral: a Llama/Mistral decoder whose MLP is a sparse mixture of experts.

Each layer's `block_sparse_moe` routes every token to its top-k of E experts (softmax, top-k,
weights renormalised to sum to 1) and sums their SiLU-gated MLPs through `FusedMoE`. Attention,
norms and rotary are the Llama family's, so this file adds only the sparse block and
`SparseMoEForCausalLM`, the loading shared by every mixture-of-experts family built on the Llama
decoder (Mixtral here, Qwen2-MoE and Qwen3-MoE in qwen_moe.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.layers.linear import ReplicatedLinear
from kubeinfer.engine.layers.moe import FusedMoE, load_expert_weight
from kubeinfer.engine.models.llama import LlamaForCausalLM


def check_moe_config(config: Any, num_experts: int) -> None:
    """ConfigError for what the fused experts cannot run: a non-SiLU activation or a top-k that
    does not fit the number of experts."""
    if config.hidden_act != "silu":
        raise ConfigError(f"hidden_act {config.hidden_act!r} in config.json is not supported by the "
                          "native mixture-of-experts models; only 'silu' is")
    top_k = config.num_experts_per_tok
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"num_experts_per_tok ({top_k}) in config.json must be between 1 and the "
                          f"number of experts ({num_experts}); fix the config")


class SparseMoEForCausalLM(LlamaForCausalLM):
    """A Llama-family decoder with mixture-of-experts MLPs (set by `make_mlp` in subclasses).

    Per-expert checkpoint matrices (`...experts.<e>.<proj>.weight`, proj a key of
    `expert_shard_names`) go into the stacked FusedMoE parameters; every other tensor loads as in
    Llama. `checkpoint_renames` maps checkpoint module names onto ours (Mixtral's
    `block_sparse_moe` is our `mlp`).
    """

    expert_shard_names: dict[str, str] = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    checkpoint_renames: dict[str, str] = {}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for old, new in self.checkpoint_renames.items():
                    name = name.replace(old, new)
                target = load_expert_weight(params, name, tensor, self.expert_shard_names)
                if target is None:
                    yield name, tensor
                else:
                    loaded.add(target)

        return super().load_weights(dense()) | loaded


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        num_experts = config.num_local_experts
        check_moe_config(config, num_experts)
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.intermediate_size, renormalize=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralForCausalLM(SparseMoEForCausalLM):
    expert_shard_names = {"w1": "w1", "w2": "w2", "w3": "w3"}
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(config)
