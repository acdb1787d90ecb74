"""Image keys for prefix-cache block hashes.

A block's hash chains its parent's hash and its token ids; the placeholder ids of two different
images are equal, so a block that holds image positions must also fold in the image's hash, or a
request would reuse KV computed from another picture. The KV manager keeps per request the list
`MultiModalInputs.hash_spans()` gives, and hashes block i as
`hash((parent, token_ids, block_image_keys(spans, i * block_size, (i + 1) * block_size)))`; a
text-only block gets () and so keeps its hash.
"""
from __future__ import annotations

from collections.abc import Sequence


def block_image_keys(spans: Sequence[tuple[int, int, str]], start: int, end: int) -> tuple[str, ...]:
    """Hashes of the images whose positions overlap the block [start, end), in prompt order.
    `spans` are (offset, length, hash), ascending by offset."""
    keys = []
    for offset, length, image_hash in spans:
        if offset >= end:
            break  # ascending: nothing later overlaps
        if offset + length > start:
            keys.append(image_hash)
    return tuple(keys)
