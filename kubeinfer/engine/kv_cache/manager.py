"""Per-request view of the KV cache: block tables, prefix-cache lookups and slot allocation.

The manager makes no policy: the scheduler asks whether a request's next tokens fit and decides what
to do when they don't.
"""
from __future__ import annotations

from kubeinfer.engine.attention_spans import block_span_keys, round_cache_hit
from kubeinfer.engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from kubeinfer.engine.multimodal.block_keys import block_image_keys
from kubeinfer.engine.request import Request


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...],
               image_keys: tuple[str, ...] = ()) -> int:
    """Chained hash: a block's hash covers every token before it, so equal hashes mean equal
    prefixes. A block holding image positions also covers those images' hashes (their placeholder
    ids are the same for every picture); a text-only block keeps its text-only hash."""
    if image_keys:
        return hash((parent_hash, token_ids, image_keys))
    return hash((parent_hash, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._req_to_block_ids: dict[str, list[int]] = {}  # the same tables as plain ids, per step
        self._req_to_hashes: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # blocks of the request registered so far
        # prefix-cache counters since the last take_stats()
        self._queries = 0
        self._hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def take_prefix_cache_stats(self) -> tuple[int, int]:
        """(queried tokens, hit tokens) since the last call."""
        stats = (self._queries, self._hits)
        self._queries = self._hits = 0
        return stats

    def _block_hashes(self, req: Request, num_tokens: int) -> list[int]:
        """Hashes of the request's full blocks among its first num_tokens tokens, extended lazily."""
        hashes = self._req_to_hashes.setdefault(req.req_id, [])
        num_tokens = min(num_tokens, req.num_known_tokens)  # never hash a placeholder
        bs = self.block_size
        tokens = req.all_token_ids
        spans = req.mm_hash_spans if req.mm_features else ()
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            keys = block_image_keys(spans, i * bs, (i + 1) * bs) if spans else ()
            if req.bidir_spans:  # K/V inside a span depends on the whole span
                keys += block_span_keys(req.bidir_spans, i * bs, (i + 1) * bs)
            hashes.append(hash_block(parent, tuple(tokens[i * bs:(i + 1) * bs]), keys))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that has computed nothing yet.

        Returns the blocks and the number of tokens they hold. At least one token is always left to
        compute, since the last position's logits are needed to sample; so is every position whose
        logits prompt_logprobs still needs (a cached prefix has no logits), as vLLM does. Such a
        request still registers the blocks it computes.
        """
        if not self.enable_caching:
            return [], 0
        max_hit_tokens = req.num_tokens - 1
        logits_start = req.prompt_logits_start
        if logits_start is not None:
            if logits_start == 0:
                return [], 0  # no lookup at all, and none counted in the hit rate (as vLLM)
            max_hit_tokens = min(max_hit_tokens, logits_start)
        hashes = self._block_hashes(req, max_hit_tokens)
        hits: list[KVCacheBlock] = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        if req.bidir_spans:  # never half a span: its K/V is computed in one step, whole
            hits = hits[:round_cache_hit(req.bidir_spans, len(hits) * self.block_size,
                                         self.block_size) // self.block_size]
        self._queries += req.num_tokens
        self._hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Make room for num_new_tokens more tokens of req; False (and no change) if they don't fit.

        new_computed_blocks are prefix-cache hits from get_computed_blocks for a request being
        scheduled for the first time (or again after preemption).
        """
        blocks = self.req_to_blocks.get(req.req_id, [])
        num_total = req.num_computed_tokens + num_new_tokens
        if not new_computed_blocks and num_total <= len(blocks) * self.block_size:
            # the common decode step: room in the last block, at most a block to register
            if self.enable_caching and num_total // self.block_size > \
                    self._num_cached_blocks.get(req.req_id, 0):
                self._cache_full_blocks(req, blocks, num_total)
            return True
        new_computed_blocks = new_computed_blocks or []
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_required = -(-num_total // self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # hits sitting in the free queue stop being free once touched
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_evictable_hits:
            return False
        self.pool.touch(new_computed_blocks)
        blocks = self.req_to_blocks.setdefault(req.req_id, [])
        block_ids = self._req_to_block_ids.setdefault(req.req_id, [])
        if num_new_blocks > 0:
            new_computed_blocks = new_computed_blocks + self.pool.get_new_blocks(num_new_blocks)
        if new_computed_blocks and not blocks:
            self._num_cached_blocks[req.req_id] = num_computed // self.block_size
        blocks.extend(new_computed_blocks)
        block_ids.extend(b.block_id for b in new_computed_blocks)
        if self.enable_caching:
            self._cache_full_blocks(req, blocks, num_total)
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        # Registering a block before this step's forward has written it is safe: every layer writes
        # the whole batch's K/V before any attention reads it, and later steps see finished blocks.
        hashes = self._block_hashes(req, num_tokens)
        # hashes may run ahead (a prefix lookup) or behind (placeholders of async scheduling)
        num_full = min(num_tokens // self.block_size, len(hashes))
        start = self._num_cached_blocks.get(req.req_id, 0)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[req.req_id] = max(start, num_full)

    def get_block_ids(self, req_id: str) -> list[int]:
        """The request's block table. The list is live: read it, don't change it."""
        return self._req_to_block_ids.get(req_id, [])

    def free(self, req: Request) -> None:
        """Return a finished, aborted or preempted request's blocks; tail blocks are evicted first."""
        blocks = self.req_to_blocks.pop(req.req_id, [])
        self._req_to_block_ids.pop(req.req_id, None)
        self.pool.free_blocks(list(reversed(blocks)))
        self._num_cached_blocks.pop(req.req_id, None)
        if req.is_finished:
            self._req_to_hashes.pop(req.req_id, None)
