"""The plain data a multimodal prompt becomes: what the server hands the engine's add_request.

`MultiModalInputs` holds the expanded prompt ids, and per image an `ImageFeature`: its content
hash, where its placeholder tokens sit (`PlaceholderRange`) and the tensors its vision encoder
takes. The scheduler and the KV manager read only hashes and ranges; only the runner reads tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlaceholderRange:
    """Positions [offset, offset + length) of one image in the prompt. Inside, `is_embed[k]` says
    whether position offset + k takes a row of the image's encoder output (Idefics3 interleaves
    row/column tokens that stay text); None means every position does."""

    offset: int
    length: int
    is_embed: tuple[bool, ...] | None = None

    def __post_init__(self):
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"bad placeholder range offset={self.offset} length={self.length}")
        if self.is_embed is not None and len(self.is_embed) != self.length:
            raise ValueError("is_embed must have one entry per position of the range")

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def num_embeds(self) -> int:
        """Rows of encoder output the image fills."""
        return self.length if self.is_embed is None else sum(self.is_embed)

    def embeds_before(self, pos: int) -> int:
        """Encoder rows that belong to positions in [offset, pos) (pos clamped to the range)."""
        k = min(max(pos - self.offset, 0), self.length)
        return k if self.is_embed is None else sum(self.is_embed[:k])


@dataclass(frozen=True)
class ImageFeature:
    """One image of a prompt. `encoder_inputs` are this image's tensors from the processor (e.g.
    pixel_values [1, 3, H, W]; image_sizes), the batch dimension kept."""

    image_hash: str
    placeholder: PlaceholderRange
    encoder_inputs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class MultiModalInputs:
    """A processed prompt: token ids with each image's placeholder expanded, its images in prompt
    order (their ranges ascending and disjoint)."""

    prompt: str
    prompt_token_ids: list[int]
    features: tuple[ImageFeature, ...]

    def hash_spans(self) -> list[tuple[int, int, str]]:
        """(offset, length, image hash) per image: the per-request list the KV manager folds into
        block hashes (see block_keys.py)."""
        return [(f.placeholder.offset, f.placeholder.length, f.image_hash) for f in self.features]
