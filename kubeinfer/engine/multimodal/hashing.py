"""The content hash of an image: what prefix caching and the encoder cache key images by.

It covers the decoded pixels (mode, size, bytes), not the encoded file, so one picture sent as PNG
and as a byte-identical re-encode shares cache entries, and two pictures share one only when every
pixel agrees. sha256 because hashes of different requests meet in one cache: a collision would
hand one user's image features to another.
"""
from __future__ import annotations

import hashlib


def hash_image(image) -> str:
    """Hex sha256 of a PIL image's mode, size and pixel bytes."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()
