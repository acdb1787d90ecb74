"""One encoder call for many images: grouping a step's images into batches that stack, and moving
their host tensors to the device once.

A vision tower costs far more per call than its FLOPs when it runs one image at a time (on a GPU
the kernels of one 577-patch image leave most of the chip idle, and every call repeats the
launches), so the runner hands a model every image its encoder runs in a step (`embed_images`);
the model groups them here by what can be stacked and moves each group's pixels in one copy.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


def group_by(items: Sequence[Any], key: Callable[[Any], Hashable]) -> list[list[int]]:
    """Indices of `items` grouped by `key`, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def to_device(host: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """`host` on `device` (cast to `dtype` there). To a GPU the copy goes from pinned memory and
    does not block: a pageable copy would make the host wait for the stream, i.e. for the step in
    flight. The cast runs on the device, where it costs nothing next to the encoder."""
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory() if not host.is_pinned() else host
        out = host.to(device, non_blocking=True)
    else:
        out = host.to(device)
    return out if dtype is None else out.to(dtype)


def split_rows(out: torch.Tensor | Sequence[torch.Tensor], num_images: int,
               num_rows: Sequence[int] | None = None) -> list[torch.Tensor]:
    """One batched encoder output ([images, rows, H], [all rows, H], or one tensor per image) as
    one [rows, H] tensor per image: `num_rows[i]` rows for image i, or equal shares when None
    (images stacked because their inputs have one shape). Views: no copy, no sync."""
    if isinstance(out, (list, tuple)):
        parts = [o.reshape(-1, o.shape[-1]) for o in out]
        if len(parts) == num_images:
            return parts
        out = torch.cat(parts, dim=0)
    rows = out.reshape(-1, out.shape[-1])
    if num_rows is None:
        if rows.shape[0] % num_images:
            raise ValueError(f"the encoder gave {rows.shape[0]} rows for {num_images} images of "
                             f"one shape")
        num_rows = [rows.shape[0] // num_images] * num_images
    if rows.shape[0] != sum(num_rows):
        raise ValueError(f"the encoder gave {rows.shape[0]} rows for images with "
                         f"{sum(num_rows)} placeholder embeddings in all")
    return list(torch.split(rows, list(num_rows), dim=0))
