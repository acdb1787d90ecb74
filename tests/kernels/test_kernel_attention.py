"""Triton unified paged attention against reference.unified_attention."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import attention, reference
from tests.kernels.paged_batch import MIXED, make_batch

HAS_CUDA = torch.cuda.is_available()

# Tolerances. float32: both sides accumulate in float32 in a different order (the interpreter's dot
# is numpy float32; on GPU we ask for IEEE float32, not tf32). float16: the kernel rounds the
# softmax probabilities to fp16 before the P @ V dot (2**-11 relative) and the output to fp16.
# bfloat16: the same with 2**-8, so about 8x looser. Triton's interpreter computes bf16 dots
# wrongly (Triton 3.9), so bf16 runs only where a GPU compiles the kernel.
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def check(batch, dtype, num_segments=None, **kw):
    out = torch.full_like(batch["q"], float("nan"))
    got = attention.launch_unified_attention(**batch, **kw, out=out, num_segments=num_segments)
    assert got is out
    want = reference.unified_attention(**{k: v.cpu() if torch.is_tensor(v) else v
                                          for k, v in batch.items()}, **kw)
    assert torch.isfinite(got).all(), "unwritten or NaN output rows"
    torch.testing.assert_close(got.cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_mixed_batch(head_size, block_size, dtype, device):
    check(make_batch(MIXED, 6, 2, head_size, block_size, dtype, device), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("head_size", [64, 80])
def test_long_contexts(head_size, window, dtype, device):
    # Contexts of several key tiles: the kernel skips the score mask on tiles every row sees
    # whole (below the chunk's first position, above the window's start), masks the rest.
    batch = make_batch([(5, 200), (1, 300), (40, 170), (1, 64)], 4, 2, head_size, 16, dtype, device)
    check(batch, dtype, sliding_window=window)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 1), (12, 4), (32, 1)])
def test_gqa_mqa(num_heads, num_kv_heads, device):
    batch = make_batch([(3, 40), (1, 9), (7, 7)], num_heads, num_kv_heads, 64, 16,
                       torch.float32, device)
    check(batch, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 8, 20])
def test_sliding_window(window, dtype, device):
    batch = make_batch(MIXED + [(1, 70)], 6, 2, 64, 16, dtype, device)
    check(batch, dtype, sliding_window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype, device):
    batch = make_batch(MIXED, 6, 2, 128, 16, dtype, device)
    batch["q"] = batch["q"] * 4  # scores well past the cap, so capping changes the result
    check(batch, dtype, softcap=2.0)


@pytest.mark.parametrize("head_size,num_heads,num_kv_heads", [(80, 6, 2), (96, 8, 1), (64, 3, 3)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("cap", [0.5, 50.0])
def test_softcap_odd_shapes(head_size, num_heads, num_kv_heads, window, cap, device):
    # Gemma 2's capping (50) and a tight one (0.5), with odd head sizes, MQA, a sliding window and
    # a batch of odd chunk lengths past several key tiles.
    batch = make_batch([(3, 45), (1, 1), (1, 70), (17, 17), (9, 130)], num_heads, num_kv_heads,
                       head_size, 16, torch.float32, device)
    batch["q"] = batch["q"] * 6
    batch["scale"] = 0.37  # Gemma's query_pre_attn_scalar ** -0.5 need not be head_size ** -0.5
    check(batch, torch.float32, softcap=cap, sliding_window=window)


def test_softcap_changes_reference():
    # The reference applies the cap: capped and uncapped results differ on large scores.
    batch = make_batch([(4, 20)], 4, 2, 64, 16, torch.float32, "cpu")
    batch["q"] = batch["q"] * 8
    capped = reference.unified_attention(**batch, softcap=1.0)
    assert not torch.allclose(capped, reference.unified_attention(**batch), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 96])
def test_decode_only(head_size, dtype, device):
    batch = make_batch([(1, 1), (1, 17), (1, 64), (1, 100)], 8, 2, head_size, 16, dtype, device)
    check(batch, dtype, num_segments=1)


@pytest.mark.parametrize("num_segments", [2, 4, 8])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 24}, {"softcap": 3.0}])
def test_split_kv_forced(num_segments, extra, device):
    batch = make_batch([(1, 1), (1, 33), (1, 130), (1, 75)], 6, 2, 80, 16, torch.float32, device)
    check(batch, torch.float32, num_segments=num_segments, **extra)


def test_split_kv_auto(device):
    # Two decodes over 2 KV heads with a 600-token context: 4 programs for 132 SMs, so the
    # wrapper splits the context into segments on its own.
    batch = make_batch([(1, 600), (1, 590)], 4, 2, 64, 32, torch.float16, device)
    assert attention._num_segments(2, 2, 600, 64, 132) > 1
    check(batch, torch.float16)


def test_split_kv_heuristic():
    assert attention._num_segments(64, 8, 2048, 64, 132) == 1  # enough programs already
    assert attention._num_segments(1, 8, 100, 64, 132) == 1  # context too short to split
    assert attention._num_segments(1, 8, 8192, 64, 132) == 64
    assert attention._num_segments(8, 8, 8192, 64, 132) == 8


@pytest.mark.parametrize("num_sms", [1, 132])
@pytest.mark.parametrize("reqs", [[(48, 60)], [(20, 20), (1, 45), (30, 45), (1, 3)]])
def test_large_q_tiles(reqs, num_sms, device, monkeypatch):
    # max_query_len * GROUP >= 64 selects 64-row Q tiles spanning many tokens; pretending the GPU
    # has one SM makes even this small batch big enough for 128-row tiles.
    monkeypatch.setattr(attention, "_sm_count", lambda _: num_sms)
    check(make_batch(reqs, 8, 2, 64, 16, torch.float16, device), torch.float16)


def test_empty_request_strided_q_and_int64_metadata(device):
    batch = make_batch([(4, 20), (0, 9), (1, 5)], 4, 2, 64, 16, torch.float32, device)
    qkv = torch.randn(batch["q"].shape[0], 8, 64, device=device)  # q is a view with a wide stride
    qkv[:, :4] = batch["q"]
    batch["q"] = qkv[:, :4]
    batch["query_start_loc"] = batch["query_start_loc"].long()
    batch["seq_lens"] = batch["seq_lens"].long()
    check(batch, torch.float32)


def test_default_out_and_public_signature(device):
    batch = make_batch(MIXED, 6, 2, 64, 16, torch.float32, device)
    got = attention.unified_attention(**batch)
    want = reference.unified_attention(**{k: v.cpu() if torch.is_tensor(v) else v
                                          for k, v in batch.items()})
    torch.testing.assert_close(got.cpu(), want, atol=TOL[torch.float32], rtol=TOL[torch.float32])


# Real sizes in bf16 on a GPU.
GPU_CASES = {
    "decode64x2048": ([(1, 2048 - 31 * i) for i in range(64)], 32, 8, 128, 16),
    "mixed": ([(512, 512)] * 2 + [(256, 1280), (384, 3000)]
              + [(1, 1000 + 37 * i) for i in range(32)], 32, 8, 128, 16),
    "split_b4_8192": ([(1, 8192), (1, 8000), (1, 5000), (1, 77)], 32, 8, 128, 16),
    "head256": ([(300, 700), (1, 2000), (1, 33)], 16, 4, 256, 32),
    "head80_mqa": ([(200, 900), (1, 2048)], 32, 1, 80, 16),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 1024}, {"softcap": 30.0}])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_real_sizes(case, extra):
    reqs, h, kvh, d, bs = GPU_CASES[case]
    batch = make_batch(reqs, h, kvh, d, bs, torch.bfloat16, "cuda")
    check(batch, torch.bfloat16, **extra)
