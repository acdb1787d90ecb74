"""M-RoPE positions (Qwen2-VL, Qwen2.5-VL): three position ids per token (temporal, height, width).

A text token has the same id in all three rows; an image's tokens (its grid of merged patches,
grid_t x grid_h/merge x grid_w/merge) take start + (t, h, w) of their cell, where start is the
position after the preceding text, and the text after the image continues at start + max(grid_h,
grid_w)/merge, which is the image's highest position + 1 (as HF's `get_rope_index`). So a prompt
with images ends below its length, and every later token's position is its index + the rope delta
(the prompt's highest position + 1 - its length, <= 0): decode continues from the prompt's highest
position + 1, not from the sequence length.

`prompt_positions` computes a prompt's [3, P] ids and delta once, when the runner admits the request
(again after preemption, from the same prompt and images); `step_positions` cuts a step's [3, T] ids
out of them for each request's chunk, so chunked prefill (a chunk inside an image) and prefix-cache
hits (a chunk that starts further along) read the same ids the whole prompt would have. A
text-only prompt has none of its own: its ids are the plain positions in all three rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MRopePositions:
    """What a request's M-RoPE ids depend on besides its images: the tower's spatial merge."""

    spatial_merge_size: int

    def prompt_positions(self, num_prompt_tokens: int, features: Sequence[Any]
                         ) -> tuple[np.ndarray | None, int]:
        """([3, P] int64 ids, rope delta) of a prompt with `features` (multimodal ImageFeature, in
        prompt order, each with `image_grid_thw` [1, 3] in its encoder inputs); (None, 0) for a
        prompt without images. Raises ValueError when an image's grid does not fill its
        placeholder (the request then fails alone)."""
        if not features:
            return None, 0
        merge = self.spatial_merge_size
        out = np.empty((3, num_prompt_tokens), dtype=np.int64)
        text_start = next_pos = 0  # prompt index where the current text run starts; its position
        for f in features:
            grid = np.asarray(f.encoder_inputs["image_grid_thw"]).reshape(-1)
            t, h, w = (int(x) for x in grid[:3])
            h, w = h // merge, w // merge
            offset, length = f.placeholder.offset, f.placeholder.length
            if f.placeholder.is_embed is not None or length != t * h * w:
                raise ValueError(f"an image's grid {t}x{h}x{w} (merged) does not fill its "
                                 f"{length} placeholder tokens")
            if offset < text_start or offset + length > num_prompt_tokens:
                raise ValueError("image placeholders must be in prompt order and inside the prompt")
            n_text = offset - text_start
            out[:, text_start:offset] = np.arange(next_pos, next_pos + n_text)
            start = next_pos + n_text
            cells = np.arange(length)
            out[0, offset:offset + length] = start + cells // (h * w)
            out[1, offset:offset + length] = start + (cells // w) % h
            out[2, offset:offset + length] = start + cells % w
            next_pos = start + max(h, w)
            text_start = offset + length
        out[:, text_start:] = np.arange(next_pos, next_pos + num_prompt_tokens - text_start)
        return out, int(out.max()) + 1 - num_prompt_tokens


def step_positions(positions: np.ndarray, starts: Sequence[int], query_lens: Sequence[int],
                   prompt_ids: Sequence[np.ndarray | None], deltas: Sequence[int]) -> np.ndarray:
    """[3, T] ids of a step's tokens: each request r computes query_lens[r] tokens from starts[r];
    `positions` [T] are their plain positions (the attention arrays'). A token past its prompt's own
    ids (or of a prompt without any) gets its plain position + the request's delta in all rows."""
    lens = np.asarray(query_lens, dtype=np.int64)
    out = np.repeat((positions + np.repeat(np.asarray(deltas, dtype=np.int64), lens))[None], 3, 0)
    offset = 0
    for start, n, ids in zip(starts, query_lens, prompt_ids):
        # only chunks that reach into a prompt with images need more than the delta
        if ids is not None and start < ids.shape[1]:
            end = min(start + n, ids.shape[1])
            out[:, offset:offset + end - start] = ids[:, start:end]
        offset += n
    return out
