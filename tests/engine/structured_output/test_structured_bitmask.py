"""The packed token bitmask: the torch path against a plain loop, the Triton kernel against the
torch path (TRITON_INTERPRET=1 on CPU, see conftest.py) on odd shapes, and fill_bitmask."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.structured_output.bitmask import (allocate_bitmask, apply_bitmask,
                                                         apply_bitmask_reference, bitmask_width,
                                                         fill_bitmask)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_case(num_tokens: int, vocab: int, num_rows: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, vocab, generator=gen) * 3).to(dtype)
    words = torch.randint(-2**31, 2**31 - 1, (num_rows, bitmask_width(vocab)), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    words[:1] = -1  # one row (if any) that allows everything
    rows = torch.randperm(num_tokens, generator=gen)[:num_rows].to(torch.int32)
    return logits, words, rows


def test_reference_matches_a_plain_loop():
    logits, bitmask, rows = random_case(5, 77, 3, torch.float32, seed=1)
    expected = logits.clone()
    for i, r in enumerate(rows.tolist()):
        for t in range(77):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    apply_bitmask_reference(logits, bitmask, rows)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("num_tokens, vocab, num_rows, block_v", [
    (1, 33, 1, 32), (7, 1000, 4, 256), (3, 4097, 3, 1024), (9, 50, 0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference(num_tokens, vocab, num_rows, block_v, dtype):
    from kubeinfer.kernels.token_bitmask import apply_token_bitmask

    logits, bitmask, rows = random_case(num_tokens, vocab, num_rows, dtype,
                                        seed=vocab * 31 + num_rows)
    expected = logits.clone()
    apply_bitmask_reference(expected, bitmask, rows)
    got = logits.to(DEVICE)
    apply_token_bitmask(got, bitmask.to(DEVICE), rows.to(DEVICE), block_v=block_v)
    # Masking copies values or writes -inf: exact in every dtype.
    assert torch.equal(got.cpu(), expected)
    untouched = [r for r in range(num_tokens) if r not in rows.tolist()]
    assert torch.equal(got.cpu()[untouched], logits[untouched])


def test_apply_bitmask_checks_its_arguments():
    logits, bitmask, rows = random_case(4, 64, 2, torch.float32, seed=3)
    with pytest.raises(ValueError, match="2 rows but 1"):
        apply_bitmask(logits, bitmask, rows[:1])
    with pytest.raises(ValueError, match="covers 32 tokens"):
        apply_bitmask(logits, bitmask[:, :1], rows)
    apply_bitmask(logits, bitmask, rows.tolist())  # a list of rows is fine
    assert torch.isinf(logits[rows.long()]).any()


class _FixedMatcher:
    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def fill_bitmask_row(self, bitmask, row):
        bitmask[row] = 0
        for t in self.allowed:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)


def test_fill_then_apply_masks_each_request_row():
    vocab = 70
    matchers = [_FixedMatcher([0, 69]), _FixedMatcher([33])]
    bitmask = allocate_bitmask(len(matchers), vocab)
    fill_bitmask(matchers, bitmask)
    logits = torch.randn(3, vocab)
    apply_bitmask(logits, bitmask, [2, 0])
    assert torch.isfinite(logits[1]).all()  # not a constrained row
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [0, 69]
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [33]
    with pytest.raises(ValueError, match="1 rows for 2 matchers"):
        fill_bitmask(matchers, allocate_bitmask(1, vocab))
