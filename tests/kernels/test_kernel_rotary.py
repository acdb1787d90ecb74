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
