"""Triton rms_norm / fused_add_rms_norm against the references."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import norm, reference

HAS_CUDA = torch.cuda.is_available()
# Triton 3.9's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even, so
# bf16 rounding can only be checked where a GPU compiles the kernel; float16 (rounded correctly by
# the interpreter) exercises the same rounding-order code on CPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# The kernel rounds where the reference rounds (sum -> x's dtype, normalized -> x's dtype, product
# -> output dtype), so only the float32 mean of squares differs (summation order, rsqrt
# approximation on GPU). That can move a value across a rounding boundary: allow one ulp of the
# output dtype (bf16 2**-8, fp16 2**-11 relative) and float32 noise for float32.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)
    if dtype != torch.float32:
        # Rounding in the wrong place (e.g. weight applied before the cast) differs in a large
        # share of elements; the float32 noise above flips almost none.
        assert (got.cpu() != want).float().mean() <= 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(7, 64), (3, 96), (5, 1000), (1, 4096)])
def test_rms_norm(num_tokens, hidden, dtype, device):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device) * 3
    weight = torch.randn(hidden, dtype=dtype, device=device)
    got = norm.rms_norm(x, weight, 1e-6)
    assert_close(got, reference.rms_norm(x.cpu(), weight.cpu(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(7, 64), (3, 96), (5, 1000)])
def test_fused_add_rms_norm(num_tokens, hidden, dtype, device):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=device) * 2
    weight = torch.randn(hidden, dtype=dtype, device=device)
    x_before, residual_before = x.clone(), residual.clone()
    got, got_residual = norm.fused_add_rms_norm(x, residual, weight, 1e-5)
    want, want_residual = reference.fused_add_rms_norm(x.cpu(), residual.cpu(), weight.cpu(), 1e-5)
    # The sum is one rounding of an exact float32 sum on both sides: bit-identical.
    assert torch.equal(got_residual.cpu(), want_residual)
    assert_close(got, want, dtype)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_mixed_dtypes_follow_torch_promotion(device):
    # Half-precision activations with a float32 weight: the reference returns float32.
    low = torch.bfloat16 if HAS_CUDA else torch.float16
    x = torch.randn(5, 128, dtype=low, device=device)
    residual = torch.randn(5, 128, dtype=torch.float32, device=device)
    weight = torch.randn(128, dtype=torch.float32, device=device)
    assert_close(norm.rms_norm(x, weight, 1e-6), reference.rms_norm(x.cpu(), weight.cpu(), 1e-6),
                 torch.float32)
    got, got_res = norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    want, want_res = reference.fused_add_rms_norm(x.cpu(), residual.cpu(), weight.cpu(), 1e-6)
    assert torch.equal(got_res.cpu(), want_res)
    assert_close(got, want, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_real_size():
    x = torch.randn(8192, 4096, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    got, got_res = norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    want, want_res = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(got_res, want_res)
    assert_close(got, want.cpu(), torch.bfloat16)
