"""ALiBi in the unified paged attention kernel against reference.unified_attention.

Slopes are fresh random positive numbers per head (plus Bloom-like steep ones), so every head's
bias differs; shapes are odd (head sizes 80/96, 3/6/12 heads, MQA, chunks that start mid-tile).
"""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import attention, reference
from tests.kernels.test_kernel_attention import DTYPES, MIXED, check, make_batch


def slopes_for(num_heads: int, device: str) -> torch.Tensor:
    # Spread over two orders of magnitude: 1.0 makes a head look at its last few keys only,
    # 0.01 barely changes the scores; both must agree with the reference.
    return (10.0 ** -(2.0 * torch.rand(num_heads))).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size,num_heads,num_kv_heads", [(64, 6, 2), (80, 3, 3), (96, 12, 1)])
def test_alibi_mixed_batch(head_size, num_heads, num_kv_heads, dtype, device):
    batch = make_batch(MIXED + [(1, 1), (9, 130)], num_heads, num_kv_heads, head_size, 16, dtype,
                       device)
    check(batch, dtype, alibi_slopes=slopes_for(num_heads, device))


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 20}, {"softcap": 5.0}])
def test_alibi_long_contexts_and_options(extra, device):
    # Several key tiles: the unmasked middle tiles get the bias too.
    batch = make_batch([(5, 200), (1, 300), (40, 170), (1, 64)], 4, 2, 80, 16, torch.float32,
                       device)
    check(batch, torch.float32, alibi_slopes=slopes_for(4, device), **extra)


@pytest.mark.parametrize("num_segments", [1, 4])
def test_alibi_decode_only_and_split_kv(num_segments, device):
    batch = make_batch([(1, 1), (1, 33), (1, 130), (1, 75)], 6, 2, 64, 16, torch.float32, device)
    check(batch, torch.float32, num_segments=num_segments, alibi_slopes=slopes_for(6, device))


def test_alibi_large_q_tiles(device, monkeypatch):
    monkeypatch.setattr(attention, "_sm_count", lambda _: 1)
    batch = make_batch([(20, 20), (1, 45), (30, 45), (1, 3)], 8, 2, 64, 16, torch.float16, device)
    check(batch, torch.float16, alibi_slopes=slopes_for(8, device))


def test_reference_alibi_is_relative_and_changes_the_result():
    # The reference adds slope * (key_pos - query_pos): for a lone query at position p this equals
    # attention with scores biased by slope * key_pos (Bloom's form) since the softmax drops the
    # per-row constant; and a steep slope must change the output.
    batch = make_batch([(1, 40)], 4, 4, 64, 16, torch.float32, "cpu")
    slopes = torch.tensor([2.0, 0.5, 0.1, 0.0])
    got = reference.unified_attention(**batch, alibi_slopes=slopes)
    k = batch["key_cache"][batch["block_tables"][0, :3].long()].reshape(48, 4, 64)[:40]
    v = batch["value_cache"][batch["block_tables"][0, :3].long()].reshape(48, 4, 64)[:40]
    scores = torch.einsum("hd,khd->hk", batch["q"][0], k) * batch["scale"]
    scores = scores + slopes[:, None] * torch.arange(40.0)
    want = torch.einsum("hk,khd->hd", scores.softmax(-1), v)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    plain = reference.unified_attention(**batch)
    assert not torch.allclose(got[0, 0], plain[0, 0], atol=1e-3)
    torch.testing.assert_close(got[0, 3], plain[0, 3], atol=1e-5, rtol=1e-5)  # slope 0: no bias
