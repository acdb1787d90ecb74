"""ops.py dispatch: the backend choice, and the Triton path through the public ops."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubeinfer.kernels import ops, reference

REPO = Path(__file__).resolve().parents[2]


def test_env_is_read_once_at_import_and_triton_is_not_imported():
    code = ("import sys; from kubeinfer.kernels import ops; "
            "assert 'triton' not in sys.modules, 'ops imported triton eagerly'; print(ops.backend)")
    env = {**os.environ, "KUBEINFER_KERNELS": "Torch"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch"
    env["KUBEINFER_KERNELS"] = "cuda-please"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "KUBEINFER_KERNELS" in done.stderr


def test_auto_sends_cpu_tensors_to_the_reference(monkeypatch):
    monkeypatch.setattr(ops, "backend", "auto")
    assert not ops.use_triton(torch.randn(2))
    monkeypatch.setattr(ops, "backend", "torch")
    assert not ops.use_triton(torch.randn(2))


def test_forced_triton_runs_every_op(monkeypatch, device):
    """KUBEINFER_KERNELS=triton: the same ops, through the Triton kernels (interpreted on CPU)."""
    monkeypatch.setattr(ops, "backend", "triton")
    assert ops.use_triton(torch.randn(2, device=device))
    t, h, kvh, d, bs = 6, 4, 2, 64, 16
    key = torch.randn(t, kvh, d, device=device)
    value = torch.randn(t, kvh, d, device=device)
    key_cache = torch.randn(2, bs, kvh, d, device=device)
    value_cache = torch.randn(2, bs, kvh, d, device=device)
    slots = torch.tensor([17, 18, 19, 20, -1, 21], device=device)
    want_k, want_v = key_cache.cpu().clone(), value_cache.cpu().clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    reference.reshape_and_cache(key.cpu(), value.cpu(), want_k, want_v, slots.cpu())
    assert torch.equal(key_cache.cpu(), want_k) and torch.equal(value_cache.cpu(), want_v)

    q = torch.randn(t, h, d, device=device)
    meta = dict(query_start_loc=torch.tensor([0, 5, 6], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([21, 9], dtype=torch.int32, device=device),
                block_tables=torch.tensor([[1, 0], [0, 1]], dtype=torch.int32, device=device),
                max_query_len=5, max_seq_len=21, scale=d ** -0.5)
    got = ops.unified_attention(q, key_cache, value_cache, **meta)
    want = reference.unified_attention(q.cpu(), key_cache.cpu(), value_cache.cpu(),
                                       **{k: v.cpu() if torch.is_tensor(v) else v
                                          for k, v in meta.items()})
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)

    x = torch.randn(t, 96, device=device)
    weight = torch.randn(96, device=device)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6).cpu(),
                               reference.rms_norm(x.cpu(), weight.cpu(), 1e-6))
    for got, want in zip(ops.fused_add_rms_norm(x, x * 2, weight, 1e-6),
                         reference.fused_add_rms_norm(x.cpu(), x.cpu() * 2, weight.cpu(), 1e-6)):
        torch.testing.assert_close(got.cpu(), want)
    positions = torch.randint(0, 64, (t,), device=device)
    cos_sin = torch.randn(64, d, device=device)
    for got, want in zip(ops.rotary_embedding(positions, q, key, cos_sin),
                         reference.rotary_embedding(positions.cpu(), q.cpu(), key.cpu(),
                                                    cos_sin.cpu())):
        torch.testing.assert_close(got.cpu(), want)
    torch.testing.assert_close(ops.silu_and_mul(x).cpu(), reference.silu_and_mul(x.cpu()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(ops, "backend", "auto")
    assert ops.use_triton(torch.randn(2, device="cuda"))
    monkeypatch.setattr(ops, "backend", "torch")
    assert not ops.use_triton(torch.randn(2, device="cuda"))
