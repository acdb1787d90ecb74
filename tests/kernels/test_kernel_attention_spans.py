"""Bidirectional spans in the unified paged attention kernel and its torch reference, against a
dense mask built the way HF builds it (masking_utils): Gemma 3's sliding layers AND the window over
(causal OR same image); PaliGemma 2 ORs its prefix over (causal AND window).

The per-token bounds come from attention_spans.token_bounds, as in the engine; the dense side
never sees them, so a wrong bound or a wrong tile split shows up as a mismatch.
"""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.attention_spans import token_bounds
from kubeinfer.kernels import attention, reference
from tests.kernels.conftest import HAS_CUDA
from tests.kernels.test_kernel_attention import TOL, make_batch

# (query_len, seq_len, spans as (start, end) positions inside the chunk): a chunk after a cached
# prefix with two images, a decode, a fresh prefill whose prompt is one span (PaliGemma), a chunk
# with an image longer than the sliding window used below.
CASES = [(21, 40, [(22, 27), (30, 38)]), (1, 37, []), (13, 13, [(0, 13)]),
         (40, 90, [(55, 85)])]


def dense(batch, spans_per_req, sliding_window, span_over_window):
    """[T, H, D] float32 attention with HF's mask, one request at a time."""
    q, kc, vc = batch["q"].cpu().float(), batch["key_cache"].cpu(), batch["value_cache"].cpu()
    starts, seq_lens = batch["query_start_loc"].cpu().tolist(), batch["seq_lens"].cpu().tolist()
    group = q.shape[1] // kc.shape[2]
    bs = kc.shape[1]
    out = torch.empty_like(q)
    for r, seq_len in enumerate(seq_lens):
        qs = q[starts[r]:starts[r + 1]]
        n = qs.shape[0]
        table = batch["block_tables"][r].cpu().long()
        kpos = torch.arange(seq_len)
        slots = table[kpos // bs] * bs + kpos % bs
        k = kc.reshape(-1, *kc.shape[2:])[slots].float().repeat_interleave(group, 1)
        v = vc.reshape(-1, *vc.shape[2:])[slots].float().repeat_interleave(group, 1)
        qpos = torch.arange(seq_len - n, seq_len)
        group_of = torch.full((seq_len,), -1)
        for g, (s, e) in enumerate(spans_per_req[r]):
            group_of[s:e] = g
        same = (group_of[qpos][:, None] == group_of[None, :]) & (group_of[qpos][:, None] >= 0)
        causal = kpos[None, :] <= qpos[:, None]
        window = (kpos[None, :] > qpos[:, None] - sliding_window if sliding_window
                  else torch.ones_like(causal))
        mask = (causal & window) | same if span_over_window else (causal | same) & window
        scores = torch.einsum("qhd,khd->hqk", qs, k) * batch["scale"]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[starts[r]:starts[r + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def bounds_for(cases, device):
    spans = [s for _, _, s in cases]
    starts = [sl - ql for ql, sl, _ in cases]
    lo, hi = token_bounds(spans, starts, [ql for ql, _, _ in cases])
    return spans, torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device)


@pytest.mark.parametrize("sliding_window,span_over_window", [(None, False), (12, False), (12, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spans_match_dense_mask(sliding_window, span_over_window, dtype, device):
    batch = make_batch([(ql, sl) for ql, sl, _ in CASES], 6, 2, 64, 16, dtype, device)
    spans, lo, hi = bounds_for(CASES, device)
    want = dense(batch, spans, sliding_window, span_over_window)
    kw = dict(sliding_window=sliding_window, span_lo=lo, span_hi=hi,
              span_over_window=span_over_window)
    ref = reference.unified_attention(**{k: v.cpu() if torch.is_tensor(v) else v
                                         for k, v in batch.items()},
                                      **{k: v.cpu() if torch.is_tensor(v) else v
                                         for k, v in kw.items()})
    torch.testing.assert_close(ref.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
    out = torch.full_like(batch["q"], float("nan"))
    got = attention.launch_unified_attention(**batch, **kw, out=out)
    assert torch.isfinite(got).all(), "unwritten or NaN output rows"
    torch.testing.assert_close(got.cpu().float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_spans_change_the_result(device):
    # The causal kernel on the same batch must differ on span tokens (else the test proves nothing)
    # and agree on tokens outside any span.
    batch = make_batch([(13, 13)], 4, 2, 64, 16, torch.float32, device)
    spans, lo, hi = bounds_for([(13, 13, [(2, 9)])], device)
    causal = attention.launch_unified_attention(**batch)
    bidir = attention.launch_unified_attention(**batch, span_lo=lo, span_hi=hi)
    assert not torch.allclose(causal[2:8], bidir[2:8])
    torch.testing.assert_close(causal[:2], bidir[:2])
    torch.testing.assert_close(causal[9:], bidir[9:])


def test_no_span_wider_than_a_token_gives_no_bounds():
    assert token_bounds([[(3, 4)], []], [0, 5], [6, 1]) is None
    assert token_bounds([[(3, 6)]], [6], [1]) is None  # the chunk is past the span


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("sliding_window,span_over_window", [(None, False), (1024, False),
                                                             (1024, True)])
def test_gpu_spans_real_sizes(sliding_window, span_over_window, monkeypatch):
    # Gemma 3 sizes: 256-token images in a 2k-token chunk, 128-row Q tiles, head size 256.
    cases = [(2048, 3000, [(1100, 1356), (2500, 2756)]), (1, 700, []), (600, 600, [(0, 600)])]
    monkeypatch.setattr(attention, "_sm_count", lambda _: 1)
    batch = make_batch([(ql, sl) for ql, sl, _ in cases], 8, 4, 256, 16, torch.bfloat16, "cuda")
    spans, lo, hi = bounds_for(cases, "cuda")
    want = dense(batch, spans, sliding_window, span_over_window)
    got = attention.launch_unified_attention(**batch, sliding_window=sliding_window, span_lo=lo,
                                             span_hi=hi, span_over_window=span_over_window)
    torch.testing.assert_close(got.cpu().float(), want, atol=2e-2, rtol=2e-2)
