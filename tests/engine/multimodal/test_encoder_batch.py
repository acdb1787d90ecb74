"""encoder_batch.py: grouping a step's images by what stacks, and splitting a batched encoder output
back into one tensor per image (by equal shares, given row counts, or a per-image list)."""
from __future__ import annotations

import pytest
import torch

from kubeinfer.engine.multimodal.encoder_batch import group_by, split_rows, to_device


def test_group_by_keeps_first_appearance_order():
    shapes = [(1, 3, 8, 8), (1, 3, 4, 4), (1, 3, 8, 8), (1, 5, 4, 4), (1, 3, 4, 4)]
    assert group_by(shapes, lambda s: s) == [[0, 2], [1, 4], [3]]


def test_split_rows_by_shares_counts_and_lists():
    out = torch.randn(3, 4, 6)  # three stacked images of four rows each
    parts = split_rows(out, 3)
    assert [tuple(p.shape) for p in parts] == [(4, 6)] * 3
    assert torch.equal(parts[1], out[1])
    packed = torch.randn(9, 6)  # packed images of 2, 3 and 4 rows
    parts = split_rows(packed, 3, [2, 3, 4])
    assert torch.equal(parts[2], packed[5:])
    per_image = [torch.randn(1, 2, 6), torch.randn(5, 6)]  # LLaVA-NeXT gives a list per image
    assert [tuple(p.shape) for p in split_rows(per_image, 2)] == [(2, 6), (5, 6)]


@pytest.mark.parametrize("num_rows, words", [(None, "10 rows for 3 images of one shape"),
                                             ([2, 3, 4], "10 rows for images with 9")])
def test_split_rows_refuses_a_row_count_that_does_not_add_up(num_rows, words):
    with pytest.raises(ValueError, match=words):
        split_rows(torch.randn(10, 6), 3, num_rows)


def test_to_device_casts_on_the_target():
    host = torch.randn(2, 3)
    out = to_device(host, torch.device("cpu"), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, host.to(torch.bfloat16))
