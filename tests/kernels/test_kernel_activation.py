"""Triton silu_and_mul against reference.silu_and_mul."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import activation, reference

HAS_CUDA = torch.cuda.is_available()
# Triton 3.9's interpreter truncates float32 -> bfloat16 instead of rounding to nearest even, so
# bf16 rounding can only be checked where a GPU compiles the kernel; float16 (rounded correctly by
# the interpreter) exercises the same rounding-order code on CPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# silu is rounded to the dtype before the product, as torch does; exp may differ by an ulp of
# float32 (GPU approximation), which can flip one rounding of the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,n", [(7, 64), (3, 100), (1, 2500), (4, 4096)])
def test_silu_and_mul(num_tokens, n, dtype, device):
    x = torch.randn(num_tokens, 2 * n, dtype=dtype, device=device) * 4
    got = activation.silu_and_mul(x)
    want = reference.silu_and_mul(x.cpu())
    assert got.shape == want.shape and got.dtype == want.dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])
    if dtype != torch.float32:  # silu rounded before the product: all but a few bit-identical
        assert (got.cpu() != want).float().mean() <= 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_real_size():
    x = torch.randn(8192, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(activation.silu_and_mul(x), reference.silu_and_mul(x),
                               atol=8e-3, rtol=8e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,n", [(7, 64), (3, 100), (1, 2500)])
def test_gelu_tanh_and_mul(num_tokens, n, dtype, device):
    # *4 reaches the tails where tanh saturates (the kernel's x / (1 + e^-2y) must not give NaN).
    x = torch.randn(num_tokens, 2 * n, dtype=dtype, device=device) * 4
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -3.0])
    got = activation.gelu_tanh_and_mul(x)
    want = reference.gelu_tanh_and_mul(x.cpu())
    assert got.shape == want.shape and got.dtype == want.dtype and torch.isfinite(got).all()
    # No bit-identity check as for silu: torch's 0.5 x (1 + tanh(y)) cancels in the negative
    # tail, the kernel's x * sigmoid(2y) does not, so a few % of fp16 roundings differ there.
    torch.testing.assert_close(got.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_gelu_tanh_differs_from_silu(device):
    # The constexpr switch really selects another function.
    x = torch.randn(4, 128, device=device)
    assert not torch.allclose(activation.gelu_tanh_and_mul(x), activation.silu_and_mul(x))
