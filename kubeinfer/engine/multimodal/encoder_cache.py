"""EncoderCacheManager: the scheduler's bookkeeping of vision-encoder outputs, keyed by image hash.

Plain data, no tensors (the runner's `EncoderOutputStore` holds those). An image's output exists
from the step its encoder runs until every request that needs it has computed all the image's
positions; then it is freed, and the next SchedulerOutput tells the runner to drop it. Two requests
with the same image share one output. Capacity is counted in encoder rows (embeddings).

Scheduler use, for a chunk [start, end) of request r (see chunk_images.py):

    for i in images_in_chunk(r.mm_features, start, end):
        f = r.mm_features[i]
        if cache.holds(r.req_id, f.image_hash): continue
        if cache.is_cached(f.image_hash): cache.add_ref(r.req_id, f.image_hash)
        elif cache.can_allocate(f.placeholder.num_embeds) (and the step's encoder budget allows):
            cache.allocate(r.req_id, f.image_hash, f.placeholder.num_embeds); run f's encoder
        else: end = end_before_image(f, start); break
    after the step: cache.consume(r.req_id, r.mm_features, r.num_computed_tokens)
    finish / abort / preemption: cache.release_request(r.req_id)
    each SchedulerOutput: freed = cache.take_freed()
"""
from __future__ import annotations

from collections.abc import Sequence

from kubeinfer.engine.multimodal.inputs import ImageFeature


class EncoderCacheManager:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"encoder cache capacity must be > 0 rows, not {capacity}")
        self.capacity = capacity
        self.num_free = capacity
        self._rows: dict[str, int] = {}  # image hash -> rows it holds
        self._users: dict[str, set[str]] = {}  # image hash -> requests that still need it
        self._req_hashes: dict[str, set[str]] = {}  # request -> hashes it references
        self._freed: list[str] = []

    def is_cached(self, image_hash: str) -> bool:
        """Whether the output exists or is being computed this step."""
        return image_hash in self._rows

    def holds(self, req_id: str, image_hash: str) -> bool:
        return image_hash in self._req_hashes.get(req_id, ())

    def can_allocate(self, num_rows: int) -> bool:
        return num_rows <= self.num_free

    def allocate(self, req_id: str, image_hash: str, num_rows: int) -> None:
        """Reserve room for an output the encoder computes this step, referenced by req_id."""
        if image_hash in self._rows:
            raise ValueError(f"image {image_hash[:12]} is already cached; add_ref it instead")
        if num_rows > self.num_free:
            raise ValueError(f"encoder cache has {self.num_free} free rows, {num_rows} asked; "
                             "check can_allocate first")
        self._rows[image_hash] = num_rows
        self.num_free -= num_rows
        self._users[image_hash] = set()
        self.add_ref(req_id, image_hash)

    def add_ref(self, req_id: str, image_hash: str) -> None:
        if image_hash not in self._rows:
            raise KeyError(f"image {image_hash[:12]} is not cached")
        self._users[image_hash].add(req_id)
        self._req_hashes.setdefault(req_id, set()).add(image_hash)

    def consume(self, req_id: str, features: Sequence[ImageFeature], num_computed_tokens: int) -> None:
        """Drop req_id's references to the images whose positions are all computed."""
        held = self._req_hashes.get(req_id)
        if not held:
            return
        for f in features:
            if f.placeholder.end <= num_computed_tokens and f.image_hash in held:
                self._drop(req_id, f.image_hash)

    def release_request(self, req_id: str) -> None:
        """The request finished, was aborted or preempted: drop all its references."""
        for image_hash in list(self._req_hashes.get(req_id, ())):
            self._drop(req_id, image_hash)
        self._req_hashes.pop(req_id, None)

    def take_freed(self) -> list[str]:
        """Hashes freed since the last call: the runner drops their tensors."""
        freed, self._freed = self._freed, []
        return freed

    def _drop(self, req_id: str, image_hash: str) -> None:
        self._req_hashes[req_id].discard(image_hash)
        if not self._req_hashes[req_id]:
            del self._req_hashes[req_id]
        users = self._users[image_hash]
        users.discard(req_id)
        if not users:
            del self._users[image_hash]
            self.num_free += self._rows.pop(image_hash)
            self._freed.append(image_hash)
