"""Image hashes, block keys, the chunk helpers, the encoder cache and the runner's output store,
on hand-made cases."""
from __future__ import annotations

import io

import pytest
import torch

from kubeinfer.engine.multimodal import (EncoderCacheManager, EncoderOutputStore, ImageFeature,
                                         PlaceholderRange, block_image_keys, chunk_rows,
                                         end_before_image, hash_image, images_in_chunk)
from tests.fixtures.tiny_vlm import make_image


def feature(name: str, offset: int, length: int, is_embed=None) -> ImageFeature:
    return ImageFeature(name, PlaceholderRange(offset, length, is_embed))


# ---- hashing ----
def test_image_hash_is_stable_and_follows_the_pixels():
    from PIL import Image

    a = make_image(17, 9, 0)
    buf = io.BytesIO()
    a.save(buf, format="PNG")
    again = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert hash_image(a) == hash_image(make_image(17, 9, 0)) == hash_image(again)
    b = a.copy()
    b.putpixel((16, 8), tuple(255 - c for c in a.getpixel((16, 8))))
    hashes = {hash_image(a), hash_image(b), hash_image(make_image(17, 9, 1)),
              hash_image(make_image(9, 17, 0)), hash_image(a.convert("L"))}
    assert len(hashes) == 5


# ---- block keys ----
def test_block_keys_name_the_images_a_block_overlaps():
    spans = [(3, 4, "A"), (7, 2, "B"), (20, 10, "C")]  # A: 3..6, B: 7..8, C: 20..29
    blocks = [block_image_keys(spans, s, s + 4) for s in range(0, 32, 4)]
    assert blocks == [("A",), ("A", "B"), ("B",), (), (), ("C",), ("C",), ("C",)]
    assert block_image_keys([], 0, 16) == ()


# ---- chunk helpers ----
def test_images_in_chunk_and_where_a_chunk_must_stop():
    feats = [feature("A", 4, 6), feature("B", 12, 3), feature("C", 20, 5)]  # 4..9, 12..14, 20..24
    assert images_in_chunk(feats, 0, 4) == []
    assert images_in_chunk(feats, 0, 5) == [0]
    assert images_in_chunk(feats, 9, 13) == [0, 1]
    assert images_in_chunk(feats, 10, 12) == []
    assert images_in_chunk(feats, 14, 100) == [1, 2]
    assert end_before_image(feats[2], 16) == 20  # stop just before C
    assert end_before_image(feats[0], 6) == 6  # inside A: nothing this step


def test_chunk_rows_follow_the_embed_mask():
    plain = feature("A", 10, 6)  # positions 10..15, rows 0..5
    r = chunk_rows(plain, 8, 12)
    assert (r.row_start, r.row_end, r.positions) == (0, 2, (2, 3))
    r = chunk_rows(plain, 12, 40)
    assert (r.row_start, r.row_end, r.positions) == (2, 6, (0, 1, 2, 3))
    assert chunk_rows(plain, 0, 10).positions == ()
    # Idefics3-like: a text marker at 11 and 14 inside the range
    masked = feature("B", 10, 6, (True, False, True, True, False, True))
    r = chunk_rows(masked, 8, 13)
    assert (r.row_start, r.row_end, r.positions) == (0, 2, (2, 4))
    r = chunk_rows(masked, 13, 16)
    assert (r.row_start, r.row_end, r.positions) == (2, 4, (0, 2))
    assert masked.placeholder.num_embeds == 4


def test_chunked_scatter_equals_scattering_the_whole_prompt():
    """An image cut by three chunks gets each of its rows exactly once, at its own position."""
    torch.manual_seed(0)
    feats = [feature("A", 3, 7, (True, True, False, True, True, True, False)), feature("B", 12, 4)]
    outputs = {f.image_hash: torch.randn(f.placeholder.num_embeds, 8) for f in feats}
    store = EncoderOutputStore()
    for f in feats:
        store.put(f, outputs[f.image_hash])
    whole = torch.zeros(18, 8)
    for f in feats:
        store.scatter_into(whole, f, 0, 18)
    pieces = []
    for start, end in [(0, 5), (5, 13), (13, 18)]:
        chunk = torch.zeros(end - start, 8)
        for i in images_in_chunk(feats, start, end):
            store.scatter_into(chunk, feats[i], start, end)
        pieces.append(chunk)
    assert torch.equal(torch.cat(pieces), whole)
    assert torch.equal(whole[[3, 4, 6, 7, 8]], outputs["A"])
    assert torch.equal(whole[12:16], outputs["B"])
    assert whole[[0, 1, 2, 5, 9, 10, 11, 16, 17]].abs().sum() == 0
    with pytest.raises(ValueError, match="3 rows for an image with 4"):
        store.put(feats[1], torch.zeros(3, 8))
    store.free(["A"])
    assert "A" not in store and "B" in store


# ---- the scheduler's encoder cache ----
def test_encoder_cache_shares_and_frees_when_consumed():
    cache = EncoderCacheManager(capacity=10)
    a, b = feature("A", 2, 6), feature("B", 10, 4)
    assert cache.can_allocate(6)
    cache.allocate("r1", "A", 6)
    assert cache.is_cached("A") and cache.holds("r1", "A") and cache.num_free == 4
    assert not cache.can_allocate(6)
    cache.add_ref("r2", "A")  # r2 sends the same picture: no second encoder run
    cache.allocate("r1", "B", 4)
    assert cache.num_free == 0
    cache.consume("r1", [a, b], num_computed_tokens=7)  # A not yet whole
    assert cache.take_freed() == []
    cache.consume("r1", [a, b], num_computed_tokens=8)  # A whole for r1; r2 still needs it
    assert cache.take_freed() == [] and not cache.holds("r1", "A") and cache.is_cached("A")
    cache.release_request("r2")  # r2 aborted
    assert cache.take_freed() == ["A"] and cache.num_free == 6
    cache.consume("r1", [a, b], num_computed_tokens=14)
    assert cache.take_freed() == ["B"] and cache.num_free == 10
    assert cache.take_freed() == []


def test_encoder_cache_refuses_misuse():
    cache = EncoderCacheManager(capacity=4)
    with pytest.raises(ValueError, match="4 free rows, 5 asked"):
        cache.allocate("r", "A", 5)
    cache.allocate("r", "A", 2)
    with pytest.raises(ValueError, match="already cached"):
        cache.allocate("s", "A", 2)
    with pytest.raises(KeyError):
        cache.add_ref("s", "Z")
    with pytest.raises(ValueError, match="capacity"):
        EncoderCacheManager(0)
    with pytest.raises(ValueError, match="placeholder range"):
        PlaceholderRange(0, 0)
