"""The pool of KV cache blocks: reference counts, a free queue and the prefix-cache hash map.

A block whose reference count drops to zero goes back to the free queue but keeps its hash, so a
later request with the same prefix can take it back ("touch") instead of recomputing it. Blocks are
handed out from the front of the free queue; blocks holding no cached content are put at the front
(they cost nothing to reuse), cached ones at the back, so eviction is least-recently-freed first.

A block's object is made the first time the pool hands it out: a big pool (the CPU default of
1 GiB is 131,072 blocks of a small model) built them all up front, which took ~0.25 s at start-up,
mostly the garbage collector scanning the new objects beside torch's.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._blocks: list[KVCacheBlock | None] = [None] * num_blocks  # made on first use
        # ordered free queue of block ids; the value is unused
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _block(self, block_id: int) -> KVCacheBlock:
        block = self._blocks[block_id]
        if block is None:
            block = self._blocks[block_id] = KVCacheBlock(block_id)
        return block

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self._block(block_id)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take n blocks from the free queue (evicting their cached content). Caller checks room."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks but only {len(self._free)} are free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self._block(block_id)
            if block.block_hash is not None:
                self._cached.pop(block.block_hash, None)
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference on each block, in eviction order (the first freed is evicted first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            if block.ref_cnt == 0:
                self._free[block.block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Register a full block under its chained hash. The first holder of a hash wins."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block.block_id

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self._cached.items()):
            self._block(block_id).block_hash = None
        self._cached.clear()
