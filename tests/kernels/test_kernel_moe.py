"""Triton fused MoE (routing, alignment, grouped expert GEMMs) against kernels/moe_reference.py,
and the reference against the plain definition of a mixture of experts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubeinfer.kernels import moe, moe_reference, ops

HAS_CUDA = torch.cuda.is_available()
# Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (garbage, not rounding),
# so bf16 runs only where a GPU compiles the kernel; float16 exercises the same half-precision
# path on CPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# The kernel keeps gate/up in float32 through SiLU-and-mul where the reference rounds them to the
# dtype, and sums in another order: a few ulps of the dtype (bf16 2**-8, fp16 2**-11 relative).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def make_experts(num_experts, hidden, inter, dtype, device):
    # Scaled so that every stage stays O(1), as trained weights keep it.
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device) / inter ** 0.5
    return w13.to(dtype), w2.to(dtype)


def dense_moe(x, w13, w2, router_logits, top_k, renormalize):
    """The definition: every expert on every token, weighted by a softmax masked to the top-k."""
    probs = torch.softmax(router_logits.float(), -1)
    kth = probs.topk(top_k, -1).values[:, -1:]
    gates = torch.where(probs >= kth, probs, 0.0)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for e in range(w13.shape[0]):
        h = x.double() @ w13[e].double().T
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].double().T
        out += gates[:, e:e + 1].double() * y
    return out


@pytest.mark.parametrize("num_tokens,num_experts,top_k,renormalize", [
    (1, 4, 1, True), (7, 8, 2, False), (33, 60, 4, True), (5, 128, 8, False)])
def test_moe_topk(num_tokens, num_experts, top_k, renormalize, device):
    logits = torch.randn(num_tokens, num_experts, device=device) * 3
    got_w, got_ids = moe.moe_topk(logits, top_k, renormalize)
    want_w, want_ids = moe_reference.moe_topk(logits.cpu(), top_k, renormalize)
    assert got_ids.dtype == torch.int32 and got_w.dtype == torch.float32
    assert torch.equal(got_ids.cpu(), want_ids)
    torch.testing.assert_close(got_w.cpu(), want_w, atol=1e-6, rtol=1e-5)
    if renormalize:
        torch.testing.assert_close(got_w.sum(-1).cpu(), torch.ones(num_tokens))


def test_moe_topk_reads_half_precision_logits(device):
    logits = (torch.randn(9, 8, device=device) * 3).half()
    got_w, got_ids = moe.moe_topk(logits, 2, True)
    want_w, want_ids = moe_reference.moe_topk(logits.cpu(), 2, True)
    assert torch.equal(got_ids.cpu(), want_ids)
    torch.testing.assert_close(got_w.cpu(), want_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [(1, 4, 1, 16), (7, 8, 2, 16),
                                                                  (33, 8, 2, 64), (40, 128, 8, 16)])
def test_moe_align_block_size(num_tokens, num_experts, top_k, block_m, device):
    topk_ids = torch.stack([torch.randperm(num_experts, device=device)[:top_k]
                            for _ in range(num_tokens)]).to(torch.int32)
    sorted_ids, block_experts, num_post = moe.moe_align_block_size(topk_ids, block_m, num_experts)
    num_pairs = num_tokens * top_k
    flat = topk_ids.flatten().cpu().long()
    sorted_ids, block_experts = sorted_ids.cpu().long(), block_experts.cpu().long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert num_post.item() == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.numel() % block_m == 0 and block_experts.numel() == sorted_ids.numel() // block_m
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    assert (sorted_ids[num_post.item():] == num_pairs).all()
    for pos in range(num_post.item()):  # each row sits in a block of its own expert
        pair = sorted_ids[pos].item()
        if pair < num_pairs:
            assert flat[pair] == block_experts[pos // block_m]
    # stable: ascending pair ids within an expert's group
    for e in range(num_experts):
        ids = [p for p in real.tolist() if flat[p] == e]
        assert ids == sorted(ids)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2)])
def test_fused_experts(num_tokens, num_experts, top_k, dtype, device):
    hidden, inter = 100, 40  # neither a multiple of the 64-wide tiles
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13, w2 = make_experts(num_experts, hidden, inter, dtype, device)
    weights, ids = moe_reference.moe_topk(torch.randn(num_tokens, num_experts) * 2, top_k, True)
    got = moe.fused_experts(x, w13, w2, weights.to(device), ids.to(device))
    want = moe_reference.fused_experts(x.cpu(), w13.cpu(), w2.cpu(), weights, ids)
    assert got.shape == want.shape and got.dtype == dtype and torch.isfinite(got).all()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)


def test_fused_experts_no_tokens(device):
    w13, w2 = make_experts(4, 64, 32, torch.float32, device)
    x = torch.empty(0, 64, device=device)
    ids = torch.empty(0, 2, dtype=torch.int32, device=device)
    assert moe.fused_experts(x, w13, w2, torch.empty(0, 2, device=device), ids).shape == (0, 64)


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_is_a_mixture_of_experts(renormalize):
    # The reference computes only the chosen experts; the definition runs all of them.
    x = torch.randn(11, 48, dtype=torch.float64)
    w13, w2 = make_experts(8, 48, 24, torch.float64, "cpu")
    logits = torch.randn(11, 8) * 2
    weights, ids = moe_reference.moe_topk(logits, 3, renormalize)
    got = moe_reference.fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, dense_moe(x, w13, w2, logits, 3, renormalize),
                               atol=1e-6, rtol=1e-6)


def test_ops_dispatch_uses_the_reference_on_cpu():
    x = torch.randn(5, 32)
    w13, w2 = make_experts(4, 32, 16, torch.float32, "cpu")
    weights, ids = ops.moe_topk(torch.randn(5, 4), 2, False)
    assert torch.equal(ops.fused_experts(x, w13, w2, weights, ids),
                       moe_reference.fused_experts(x, w13, w2, weights, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_gpu_qwen3_30b_a3b_shape(num_tokens):
    # One layer of Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, expert intermediate 768.
    x = torch.randn(num_tokens, 2048, device="cuda", dtype=torch.bfloat16)
    w13, w2 = make_experts(128, 2048, 768, torch.bfloat16, "cuda")
    weights, ids = moe.moe_topk(torch.randn(num_tokens, 128, device="cuda"), 8, True)
    got = moe.fused_experts(x, w13, w2, weights, ids)
    want = moe_reference.fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
