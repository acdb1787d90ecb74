"""Fused mixture-of-experts in Triton: top-k routing and the grouped expert GEMMs.

Same contracts as `moe_reference.moe_topk` / `moe_reference.fused_experts`. The shape of the
computation follows vLLM's fused_moe:

1. `moe_topk`: one program per token takes the softmax over its E router logits in float32, picks
   the k largest by repeated argmax and optionally renormalises them.
2. `moe_align_block_size`: the T*K (token, expert) pairs are sorted by expert and each expert's
   group is padded to a multiple of BLOCK_M with a sentinel pair id, so every BLOCK_M rows of the
   sorted list belong to one expert. All in torch on the device with static shapes (no host sync),
   so decode steps stay capturable in CUDA graphs.
3. `_moe_gemm_kernel`, launched twice: gate_up with SiLU-and-mul fused into the epilogue
   (x [T, H] -> intermediate [T*K, I]), then down with the routing weight multiplied in
   (intermediate -> [T*K, H]). Each program computes one BLOCK_M x BLOCK_N tile of one expert,
   gathering its A rows through the sorted pair ids.
4. The K outputs of each token are summed (torch, float32 accumulation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype
    weights_ptr,  # [T, TOP_K] float32 out
    ids_ptr,  # [T, TOP_K] int32 out
    num_experts, stride_logits,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + row * stride_logits + offs_e, mask=offs_e < num_experts,
                     other=float("-inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    # Padding lanes and already chosen experts get -1, below every probability.
    probs = tl.where(offs_e < num_experts, probs, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.argmax(probs, axis=0)
        top_w = tl.where(offs_k == k, tl.max(probs, axis=0), top_w)
        top_i = tl.where(offs_k == k, best.to(tl.int32), top_i)
        probs = tl.where(offs_e == best, -1.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)  # lanes >= TOP_K hold 0
    tl.store(weights_ptr + row * TOP_K + offs_k, top_w, mask=offs_k < TOP_K)
    tl.store(ids_ptr + row * TOP_K + offs_k, top_i, mask=offs_k < TOP_K)


def moe_topk(router_logits: torch.Tensor, top_k: int,
             renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `moe_reference.moe_topk`."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    # Grid: one program per token; a row of E logits (E <= a few hundred) fits one block.
    if num_tokens > 0:
        _topk_softmax_kernel[(num_tokens,)](
            logits_ptr=router_logits, weights_ptr=weights, ids_ptr=ids, num_experts=num_experts,
            stride_logits=router_logits.stride(0), TOP_K=top_k,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize, num_warps=1 if num_experts <= 128 else 4,
        )
    return weights, ids


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, expert) pairs by expert, each expert's group padded to block_m rows.

    topk_ids [T, K]. Pair p is token p // K's k = p % K choice. Returns
    - sorted_pair_ids [M] int32: pair ids grouped by expert (stable, so ascending within a group),
      padded with the sentinel T*K; M = T*K + min(E, T*K) * (block_m - 1) rounded up to block_m,
      a bound that depends on shapes only;
    - block_expert_ids [M / block_m] int32: the expert of each block of block_m rows (blocks past
      the padded total hold an arbitrary valid expert and are skipped by the kernel);
    - num_pairs_post_padded [1] int32: the padded total, the rows that hold work.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    # scatter_add_ rather than bincount: bincount syncs with the host to size its output.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    group_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    dest = padded_end[experts] - padded[experts] + torch.arange(num_pairs, device=device) \
        - group_start[experts]
    # At most min(E, T*K) experts are hit, each padding fewer than block_m rows.
    max_rows = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1),
                           block_m) * block_m
    sorted_pair_ids = torch.full((max_rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert_ids = block_expert_ids.clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_pair_ids, block_expert_ids, padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: x [T, H] (row = pair // A_ROW_DIV) or the intermediate [T*TOP_K, I]
    b_ptr,  # [E, N or 2N, K]: w13 (gate rows, then up rows) or w2
    c_ptr,  # [T*TOP_K, N] out, indexed by pair id
    topk_weights_ptr,  # [T*TOP_K] float32
    sorted_pair_ids_ptr,  # [M] int32, sentinel num_pairs
    block_expert_ids_ptr,  # [M / BLOCK_M] int32
    num_pairs_post_padded_ptr,  # [1] int32
    N, K, num_pairs, num_rows_max,
    stride_am, stride_be, stride_bn, stride_cm,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order (as Triton's matmul tutorial): GROUP_M row blocks, which mostly share one
    # expert, run beside each other over the N blocks, so an expert's weight tile is read once
    # from HBM and then from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_max, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_pairs_post_padded_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    row_mask = pair < num_pairs
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + pair, mask=row_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _block_config(num_pairs: int, num_experts: int) -> dict:
    """Tile sizes. With fewer pairs than experts (decode) most experts get one or two rows, so the
    smallest row tile tl.dot takes (16) wastes least; larger batches give each expert enough rows
    for 64-row tiles. Untuned defaults, of the sizes vLLM's fused_moe falls back to."""
    if num_pairs <= num_experts:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def _launch_gemm(a, b, c, topk_weights, aligned, n, k, a_row_div, gated, mul_weight, cfg) -> None:
    sorted_pair_ids, block_expert_ids, num_post = aligned
    rows_max = sorted_pair_ids.numel()
    cfg = dict(cfg)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # Grid: every (row block, column block) of the padded sorted list; M is a bound on the padded
    # total known without a host sync, and blocks past the real total return at once.
    grid = (triton.cdiv(rows_max, block_m) * triton.cdiv(n, block_n),)
    _moe_gemm_kernel[grid](
        a_ptr=a, b_ptr=b, c_ptr=c, topk_weights_ptr=topk_weights, sorted_pair_ids_ptr=sorted_pair_ids,
        block_expert_ids_ptr=block_expert_ids, num_pairs_post_padded_ptr=num_post,
        N=n, K=k, num_pairs=c.shape[0], num_rows_max=rows_max,
        stride_am=a.stride(0), stride_be=b.stride(0), stride_bn=b.stride(1), stride_cm=c.stride(0),
        A_ROW_DIV=a_row_div, GATED=gated, MUL_ROUTED_WEIGHT=mul_weight,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg,
    )


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Triton version of `moe_reference.fused_experts`."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter, top_k = two_inter // 2, topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    topk_weights = topk_weights.reshape(-1).float().contiguous()
    cfg = _block_config(num_pairs, num_experts)
    aligned = moe_align_block_size(topk_ids, cfg["BLOCK_M"], num_experts)
    intermediate = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch_gemm(x, w13, intermediate, topk_weights, aligned, n=inter, k=hidden, a_row_div=top_k,
                 gated=True, mul_weight=False, cfg=cfg)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _launch_gemm(intermediate, w2, down, topk_weights, aligned, n=hidden, k=inter, a_row_div=1,
                 gated=False, mul_weight=True, cfg=cfg)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
