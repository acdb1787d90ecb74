"""Triton rotary_embedding against reference.rotary_embedding."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import reference, rotary

HAS_CUDA = torch.cuda.is_available()
# Triton 3.9's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even, so
# bf16 rounding can only be checked where a GPU compiles the kernel; float16 (rounded correctly by
# the interpreter) exercises the same rounding-order code on CPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Same op-by-op rounding as the reference; only FMA contraction (GPU) or the order of float32
# operations can differ, by at most one ulp of the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def cos_sin_cache(max_pos, rot_dim, device, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def check(num_tokens, num_heads, num_kv_heads, head_size, rot_dim, dtype, device, strided=False):
    cache = cos_sin_cache(4096, rot_dim, device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    if strided:  # q and k as views of a fused QKV output
        qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_size, dtype=dtype,
                          device=device)
        q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    else:
        q = torch.randn(num_tokens, num_heads, head_size, dtype=dtype, device=device)
        k = torch.randn(num_tokens, num_kv_heads, head_size, dtype=dtype, device=device)
    q_before = q.clone()
    got_q, got_k = rotary.rotary_embedding(positions, q, k, cache)
    want_q, want_k = reference.rotary_embedding(positions.cpu(), q.cpu(), k.cpu(), cache.cpu())
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.dtype == want.dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])
        if dtype != torch.float32:  # op-by-op rounding: all but a few elements bit-identical
            assert (got.cpu() != want).float().mean() <= 0.01
    assert torch.equal(q, q_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (80, 80), (96, 48), (128, 128),
                                               (128, 32), (256, 256)])
def test_rotary(head_size, rot_dim, dtype, device):
    check(7, 6, 2, head_size, rot_dim, dtype, device)


def test_rotary_strided_views(device):
    check(5, 4, 1, 64, 64, torch.float32, device, strided=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_real_size():
    check(8192, 32, 8, 128, 128, torch.bfloat16, "cuda", strided=True)


# ---- the vision towers' mode: a table row per token, float32 math (HF's apply_rotary_pos_emb_vision)

def vision_inputs(num_tokens, num_heads, head_size, dtype, device):
    """q, k as views of a QKV output [T, 3, H, D] (the tower's layout) and a per-token cos|sin
    table of 2-D angles (half the frequencies turn with a row index, half with a column)."""
    qkv = torch.randn(num_tokens, 3, num_heads, head_size, dtype=dtype, device=device) * 2
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_size // 2, 2, dtype=torch.float32)
                            / (head_size // 2))
    rows = torch.randint(0, 40, (num_tokens, 1)).float()
    cols = torch.randint(0, 40, (num_tokens, 1)).float()
    freqs = torch.cat([rows * inv, cols * inv], dim=-1)  # [T, D/2]
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    return qkv[:, 0], qkv[:, 1], table, freqs


def hf_vision_rotary(q, k, table):
    """HF's vision rotary with the table's own cos and sin: cos() computed on another device can
    differ in the last bit (a GPU's from the CPU's), which is the table's business, not the
    kernel's."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    cos, sin = table.to(q.device).chunk(2, dim=-1)
    return apply_rotary_pos_emb_vision(q, k, torch.cat([cos, cos], dim=-1),
                                       torch.cat([sin, sin], dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,head_size", [(9, 2, 16), (5, 3, 80)])
def test_vision_rotary_float32_math(num_tokens, num_heads, head_size, dtype, device):
    """Strided q/k views, no positions: bit-identical to the torch reference and to HF's vision
    rotary (every step is one IEEE float32 op, then one rounding, in both)."""
    q, k, table, _ = vision_inputs(num_tokens, num_heads, head_size, dtype, device)
    assert not q.is_contiguous()
    q_before = q.clone()
    got_q, got_k = rotary.rotary_embedding(None, q, k, table, float32_math=True)
    want_q, want_k = reference.rotary_embedding(None, q.cpu(), k.cpu(), table.cpu(),
                                                float32_math=True)
    hf_q, hf_k = hf_vision_rotary(q.cpu(), k.cpu(), table)
    for got, want, hf in ((got_q, want_q, hf_q), (got_k, want_k, hf_k)):
        assert got.dtype == want.dtype == hf.dtype == dtype
        assert torch.equal(got.cpu(), want) and torch.equal(want, hf)
    assert torch.equal(q, q_before)


def test_vision_rotary_reference_bf16_equals_hf():
    """The torch path (what a CPU runs) in bfloat16 is HF's formula bit for bit; the kernel's
    bfloat16 is checked on a GPU (test above), where Triton rounds as torch does."""
    q, k, table, _ = vision_inputs(11, 2, 32, torch.bfloat16, "cpu")
    got = reference.rotary_embedding(None, q, k, table, float32_math=True)
    for ours, hf in zip(got, hf_vision_rotary(q, k, table)):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, hf)


def test_rotary_without_positions_equals_arange(device):
    """positions=None reads table row t for token t, in both modes."""
    q, k, table, _ = vision_inputs(6, 2, 32, torch.float16, device)
    arange = torch.arange(6, device=device)
    for f32 in (False, True):
        got = rotary.rotary_embedding(None, q, k, table, float32_math=f32)
        want = rotary.rotary_embedding(arange, q, k, table, float32_math=f32)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_vision_rotary_partial_rot_dim(device):
    """Features past the table's width pass through unchanged in float32 mode too."""
    q, k, table, _ = vision_inputs(4, 2, 32, torch.float32, device)
    table = table[:, [0, 1, 16, 17]].contiguous()  # the first 2 of 16 cos | sin: rot_dim 4 of 32
    got_q, got_k = rotary.rotary_embedding(None, q, k, table, float32_math=True)
    want_q, want_k = reference.rotary_embedding(None, q.cpu(), k.cpu(), table.cpu(),
                                                float32_math=True)
    assert torch.equal(got_q.cpu(), want_q) and torch.equal(got_k.cpu(), want_k)
    assert torch.equal(got_q[..., 4:], q[..., 4:]) and not torch.equal(got_q[..., :4], q[..., :4])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_vision_real_size():
    """Qwen2.5-VL-7B's tower: 16 heads of 80, a 448-pixel image's 1024 patches, bfloat16."""
    q, k, table, _ = vision_inputs(1024, 16, 80, torch.bfloat16, "cuda")
    got = rotary.rotary_embedding(None, q, k, table, float32_math=True)
    for ours, hf in zip(got, hf_vision_rotary(q, k, table)):
        assert torch.equal(ours, hf)
