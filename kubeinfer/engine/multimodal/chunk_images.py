"""Which images a prefill chunk needs, and which encoder rows go to which of its positions.

Chunked prefill may cut a prompt inside an image's placeholder. The image's encoder runs once, in
the step whose chunk [start, end) first overlaps its range; the output stays in the encoder cache
until every position of the range is computed, and each chunk takes the rows of the positions it
covers. These helpers are pure: the scheduler calls `images_in_chunk` and `end_before_image`, the
runner `chunk_rows`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubeinfer.engine.multimodal.inputs import ImageFeature


def images_in_chunk(features: Sequence[ImageFeature], start: int, end: int) -> list[int]:
    """Indices of the images whose placeholder range overlaps [start, end)."""
    out = []
    for i, f in enumerate(features):
        if f.placeholder.offset >= end:
            break
        if f.placeholder.end > start:
            out.append(i)
    return out


def end_before_image(feature: ImageFeature, start: int) -> int:
    """Where a chunk must stop when this image's encoder cannot run this step (its cache budget is
    used up): just before the image. Equal to `start` when the chunk begins inside or at the image,
    i.e. the request schedules nothing this step."""
    return max(start, feature.placeholder.offset)


@dataclass(frozen=True)
class ChunkRows:
    """Encoder rows [row_start, row_end) of one image go, in order, to the chunk's positions
    `positions` (relative to the chunk's start)."""

    row_start: int
    row_end: int
    positions: tuple[int, ...]


def chunk_rows(feature: ImageFeature, start: int, end: int) -> ChunkRows:
    """The rows of `feature`'s encoder output that the chunk [start, end) consumes."""
    ph = feature.placeholder
    lo, hi = max(start, ph.offset), min(end, ph.end)
    if lo >= hi:
        return ChunkRows(0, 0, ())
    if ph.is_embed is None:
        positions = tuple(range(lo - start, hi - start))
    else:
        positions = tuple(p - start for p in range(lo, hi) if ph.is_embed[p - ph.offset])
    row_start = ph.embeds_before(lo)
    return ChunkRows(row_start, row_start + len(positions), positions)
