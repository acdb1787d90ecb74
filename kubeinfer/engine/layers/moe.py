"""FusedMoE: the routed experts of one mixture-of-experts layer, sharded for tensor parallelism.

Every rank holds every expert, but only its slice of each expert's intermediate dimension: w1
(gate) and w3 (up) are column-parallel, w2 (down) row-parallel, exactly as a dense gated MLP is
split in `linear.py`. Each rank's partial outputs are summed by one all-reduce after the top-k
combine (or by the caller, with reduce_results=False, when a shared expert's partial sum joins
it first). The router stays replicated: every rank computes the same top-k.

Checkpoints store one matrix per expert and projection (`experts.{e}.w1.weight` in Mixtral's
names, `experts.{e}.gate_proj.weight` in Qwen's); `load_expert_weight` maps those names onto the
stacked parameters w13_weight [E, 2I/tp, H] (gate rows, then up rows) and w2_weight [E, H, I/tp].
"""
from __future__ import annotations

import re

import torch
from torch import nn

from kubeinfer.engine.layers.linear import (_check_shape, _divide, _full_shape, tp_all_reduce,
                                            tp_rank, tp_size)
from kubeinfer.kernels import ops

SHARD_IDS = ("w1", "w2", "w3")  # gate, down, up
_EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


class FusedMoE(nn.Module):
    """Routed experts: forward(hidden [T, H], router_logits [T, E]) -> [T, H].

    Routing is softmax then top-k, the chosen weights renormalised to sum to 1 when `renormalize`
    (Mixtral; Qwen-MoE's and OLMoE's `norm_topk_prob`). Experts are SiLU-gated MLPs.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, reduce_results: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of "
                             f"experts ({num_experts}); check the model's config.json")
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.reduce_results = hidden_size, reduce_results
        self.intermediate_size = _divide(intermediate_size, self.tp_size, "expert intermediate size")
        inter = self.intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str,
                      expert_id: int) -> None:
        """Copy this rank's slice of one expert's full checkpoint matrix: w1 [I, H] and w3 [I, H]
        into rows [0, I/tp) and [I/tp, 2I/tp) of w13_weight[expert_id], w2 [H, I] into
        w2_weight[expert_id]."""
        if shard_id not in SHARD_IDS:
            raise ValueError(f"expert shard id must be one of {SHARD_IDS}, got {shard_id!r}")
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"the checkpoint has a tensor of expert {expert_id}, but config.json "
                             f"says {self.num_experts} experts (0 to {self.num_experts - 1}); is "
                             "the config the checkpoint's own?")
        inter = self.intermediate_size
        if shard_id == "w2":
            target, dim = param.data[expert_id], 1
        else:
            target, dim = param.data[expert_id].narrow(0, 0 if shard_id == "w1" else inter, inter), 0
        _check_shape(loaded_weight, _full_shape(target.shape, dim, inter * self.tp_size))
        target.copy_(loaded_weight.narrow(dim, self.tp_rank * inter, inter))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = ops.moe_topk(router_logits, self.top_k, self.renormalize)
        out = ops.fused_experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights,
                                topk_ids)
        return tp_all_reduce(out) if self.reduce_results else out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"inter={self.intermediate_size}, renormalize={self.renormalize}, tp={self.tp_size}")


def load_expert_weight(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
                       shard_names: dict[str, str]) -> str | None:
    """Load `name` when it is one expert's matrix (`<prefix>.experts.<e>.<proj>.weight` with proj
    a key of shard_names, e.g. {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}) into the
    FusedMoE at `<prefix>.experts`; returns the parameter name filled, or None for other tensors."""
    match = _EXPERT_NAME.search(name)
    if match is None or match.group(2) not in shard_names:
        return None
    shard_id = shard_names[match.group(2)]
    target = f"{name[:match.start()]}.experts.{'w2' if shard_id == 'w2' else 'w13'}_weight"
    param = params.get(target)
    if param is None:
        return None
    param.weight_loader(param, tensor, shard_id, int(match.group(1)))
    return target
