"""Torch references of the mixture-of-experts kernels: top-k routing and the expert MLPs.

The CPU path runs these; `kernels/moe.py` (Triton) is tested against them. Shapes use: T tokens,
H hidden size, E experts, K experts per token (top-k), I an expert's intermediate size (this
rank's slice of it under tensor parallelism).

Expert weights are stacked per layer, in torch's [out_features, in_features] order:
w13 [E, 2I, H] holds each expert's gate rows then its up rows (w1 | w3 in Mixtral's names), and
w2 [E, H, I] its down projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_topk(router_logits: torch.Tensor, top_k: int,
             renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, then the top-k, as Mixtral / Qwen-MoE / OLMoE route.

    router_logits [T, E] (any float dtype; the softmax runs in float32). With `renormalize`
    (Mixtral always; Qwen-MoE and OLMoE when `norm_topk_prob`) the k chosen probabilities are
    divided by their sum. Returns (topk_weights [T, K] float32, topk_ids [T, K] int32), each row's
    weights in descending order.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k].

    x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, K] (float32); topk_ids [T, K].
    Returns [T, H] in x's dtype. Each expert runs once over the tokens routed to it (as HF does),
    so the cost follows the tokens, not T * E. The weighted sum is accumulated in float32.
    """
    num_tokens, hidden = x.shape
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    inter = w13.shape[1] // 2
    for expert in topk_ids.unique().tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        gate_up = F.linear(x[token_idx], w13[expert])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[expert]).float() * topk_weights[token_idx, slot, None].float()
        out.index_add_(0, token_idx, y)
    return out.to(x.dtype)
