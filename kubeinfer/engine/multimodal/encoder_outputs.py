"""EncoderOutputStore: the runner's side of the encoder cache, image hash -> encoder output tensor
[num_embeds, hidden]. The scheduler decides what lives here (encoder_cache.py); the runner puts an
output the step its encoder runs, gathers each chunk's rows when building input embeddings, and
frees what the SchedulerOutput lists as freed.
"""
from __future__ import annotations

import torch

from kubeinfer.engine.multimodal.chunk_images import chunk_rows
from kubeinfer.engine.multimodal.inputs import ImageFeature


class EncoderOutputStore:
    def __init__(self):
        self._outputs: dict[str, torch.Tensor] = {}

    def __contains__(self, image_hash: str) -> bool:
        return image_hash in self._outputs

    def __len__(self) -> int:
        return len(self._outputs)

    def put(self, feature: ImageFeature, output: torch.Tensor) -> None:
        """Store the encoder output of `feature`; its rows must match the placeholder's embeds."""
        rows = output.reshape(-1, output.shape[-1])
        if rows.shape[0] != feature.placeholder.num_embeds:
            raise ValueError(f"encoder gave {rows.shape[0]} rows for an image with "
                             f"{feature.placeholder.num_embeds} placeholder embeddings")
        self._outputs[feature.image_hash] = rows

    def scatter_into(self, embeds: torch.Tensor, feature: ImageFeature, start: int, end: int,
                     chunk_offset: int = 0) -> None:
        """Write the rows the chunk [start, end) of this request takes into `embeds` [tokens,
        hidden], whose row `chunk_offset` is the chunk's first position (its place in the step's
        flattened batch)."""
        rows = chunk_rows(feature, start, end)
        if not rows.positions:
            return
        out = self._outputs[feature.image_hash]
        index = torch.tensor(rows.positions, device=embeds.device) + chunk_offset
        embeds[index] = out[rows.row_start:rows.row_end].to(embeds.dtype)

    def gather_chunk(self, feature: ImageFeature, start: int, end: int, chunk_offset: int,
                     positions: list[int], rows: list[torch.Tensor]) -> None:
        """Append to `positions` (rows of the step's flattened batch, whose row `chunk_offset` is
        the chunk's first position) and `rows` (slices of the stored output) what the chunk
        [start, end) of this request takes: the caller writes them all in one go."""
        taken = chunk_rows(feature, start, end)
        if not taken.positions:
            return
        positions.extend(p + chunk_offset for p in taken.positions)
        rows.append(self._outputs[feature.image_hash][taken.row_start:taken.row_end])

    def free(self, image_hashes) -> None:
        for h in image_hashes:
            self._outputs.pop(h, None)
