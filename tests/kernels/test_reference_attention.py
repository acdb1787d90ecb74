"""reference.unified_attention (batched, the CPU path) against the per-request loop it replaced.

The loop below is the old reference kept as the oracle: obviously right, one request at a time.
Inputs come from paged_batch.make_batch, whose caches hold NaN in every slot no request
owns, so a padded gather that read past a sequence would show up as NaN.
"""
from __future__ import annotations

import pytest
import torch

from kubeinfer.kernels import reference
from tests.kernels.paged_batch import MIXED, make_batch

# float32: same math, other summation order. bf16/fp16: both sides compute in float32 from the
# same rounded inputs and round the output once, so one unit in the last place of the output.
TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def loop_oracle(q, key_cache, value_cache, query_start_loc, seq_lens, block_tables, scale,
                sliding_window=None, softcap=None, **_):
    bs, num_kv_heads, head_dim = key_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    out = torch.full_like(q, float("nan"))
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        q0, q1 = qsl[r], qsl[r + 1]
        if q1 == q0:
            continue
        nblk = -(-seq_len // bs)
        blocks = block_tables[r, :nblk].long()
        k = key_cache[blocks].reshape(nblk * bs, num_kv_heads, head_dim)[:seq_len]
        v = value_cache[blocks].reshape(nblk * bs, num_kv_heads, head_dim)[:seq_len]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(q[q0:q1].float().transpose(0, 1), k.transpose(1, 2)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        qpos = torch.arange(seq_len - (q1 - q0), seq_len).unsqueeze(1)
        kpos = torch.arange(seq_len).unsqueeze(0)
        mask = kpos <= qpos
        if sliding_window:
            mask &= kpos > qpos - sliding_window
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[q0:q1] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out


def check(batch, dtype, **kw):
    sentinel = torch.full_like(batch["q"], float("nan"))
    got = reference.unified_attention(**batch, **kw, out=sentinel)
    assert got is sentinel
    want = loop_oracle(**batch, **kw)
    written = ~torch.isnan(want)
    assert torch.equal(~torch.isnan(got), written), "rows written differ from the loop's"
    torch.testing.assert_close(got[written], want[written], atol=TOL[dtype], rtol=TOL[dtype])


ODD = [(5, 24), (1, 37), (13, 13), (1, 1), (7, 200), (0, 9), (1, 129), (33, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 1}, {"sliding_window": 7},
                                   {"sliding_window": 64}, {"softcap": 2.0},
                                   {"softcap": 3.0, "sliding_window": 9}])
def test_odd_mixed_batch(extra, dtype):
    batch = make_batch(ODD, 6, 2, 80, 16, dtype, "cpu")
    batch["q"] = batch["q"] * 3  # scores big enough for the softcap to matter
    check(batch, dtype, **extra)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 1), (12, 4), (14, 2)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_gqa_and_block_sizes(num_heads, num_kv_heads, block_size):
    batch = make_batch([(3, 40), (1, 9), (7, 7), (1, 64)], num_heads, num_kv_heads, 64,
                       block_size, torch.float32, "cpu")
    check(batch, torch.float32)


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 16}, {"softcap": 5.0}])
def test_decode_only(extra):
    batch = make_batch([(1, 1), (1, 17), (1, 64), (1, 100), (1, 3)], 8, 2, 64, 16,
                       torch.float32, "cpu")
    check(batch, torch.float32, **extra)


def test_scale_is_applied():
    batch = make_batch(MIXED, 4, 2, 32, 16, torch.float32, "cpu")
    batch["scale"] = 0.77
    check(batch, torch.float32)


def test_strided_q_int64_metadata_and_default_out():
    batch = make_batch([(4, 20), (0, 9), (1, 5)], 4, 2, 64, 16, torch.float32, "cpu")
    qkv = torch.randn(batch["q"].shape[0], 8, 64)
    qkv[:, :4] = batch["q"]
    batch["q"] = qkv[:, :4]
    batch["query_start_loc"] = batch["query_start_loc"].long()
    batch["seq_lens"] = batch["seq_lens"].long()
    got = reference.unified_attention(**batch)
    torch.testing.assert_close(got, loop_oracle(**batch), atol=2e-5, rtol=2e-5)


def test_many_groups_when_the_batch_is_big(monkeypatch):
    # A memory cap this small attends one request per padded group; the result must not change.
    monkeypatch.setattr(reference, "_GROUP_BYTES", 1)
    batch = make_batch(ODD, 6, 3, 64, 16, torch.float32, "cpu")
    check(batch, torch.float32, sliding_window=11)


def test_trailing_padding_tokens_are_left_alone():
    # The runner may pass more token rows than requests own (padded batches): those rows stay.
    batch = make_batch(MIXED, 4, 2, 64, 16, torch.float32, "cpu")
    batch["q"] = torch.cat([batch["q"], torch.randn(3, 4, 64)])
    out = torch.full_like(batch["q"], 7.0)
    reference.unified_attention(**batch, out=out)
    assert torch.equal(out[-3:], torch.full((3, 4, 64), 7.0))
    assert torch.isfinite(out).all() and not (out[:-3] == 7.0).all(dim=-1).any()
