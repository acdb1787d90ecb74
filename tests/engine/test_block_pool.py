"""Block pool and KV cache manager: no model, no tensors."""
import pytest

from kubeinfer.engine.kv_cache.block_pool import BlockPool
from kubeinfer.engine.kv_cache.manager import KVCacheManager
from kubeinfer.engine.request import Request, RequestStatus
from kubeinfer.engine.sampling_params import SamplingParams


def make_req(req_id, tokens, max_tokens=8):
    return Request(req_id, list(tokens), SamplingParams(max_tokens=max_tokens))


def test_pool_hands_out_and_takes_back():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.free_blocks(blocks[:1])


def test_pool_refuses_more_than_free():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(3)


def test_uncached_blocks_are_reused_before_cached_ones():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, 111)
    pool.free_blocks([a, b, c])
    # b and c hold nothing, so they are handed out before a's cached content is evicted
    got = pool.get_new_blocks(2)
    assert {x.block_id for x in got} == {b.block_id, c.block_id}
    assert pool.get_cached_block(111) is a
    (last,) = pool.get_new_blocks(1)
    assert last is a and a.block_hash is None and pool.get_cached_block(111) is None


def test_lru_eviction_order_of_cached_blocks():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    for i, blk in enumerate(blocks):
        pool.cache_block(blk, 1000 + i)
    pool.free_blocks([blocks[2]])
    pool.free_blocks([blocks[0]])
    pool.free_blocks([blocks[1]])
    assert [b.block_id for b in pool.get_new_blocks(3)] == [2, 0, 1]


def test_prefix_hit_shares_blocks_and_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_req("a", range(10))  # 2 full blocks + 2 tokens
    hits, n = kv.get_computed_blocks(a)
    assert (hits, n) == ([], 0)
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    b = make_req("b", list(range(8)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.get_block_ids("a")[:2]
    assert kv.allocate_slots(b, 3, hits)
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert kv.num_free_blocks == 10 - 3 - 1
    queries, hit_tokens = kv.take_prefix_cache_stats()
    assert (queries, hit_tokens) == (21, 8)
    for r in (a, b):
        r.status = RequestStatus.FINISHED_STOPPED
        kv.free(r)
    assert kv.num_free_blocks == 10


def test_whole_prompt_cached_still_leaves_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_req("a", range(8))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    b = make_req("b", range(8))
    hits, n = kv.get_computed_blocks(b)
    assert n == 4  # the last block is recomputed so the last position has logits


def test_hits_from_free_queue_count_against_room():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_req("a", range(8))
    kv.allocate_slots(a, 8)
    a.status = RequestStatus.FINISHED_STOPPED
    kv.free(a)
    b = make_req("b", list(range(4)) + [7] * 8)  # 12 tokens: 1 hit block + 2 new
    hits, n = kv.get_computed_blocks(b)
    assert n == 4
    assert kv.allocate_slots(b, 8, hits)
    assert kv.num_free_blocks == 0
    c = make_req("c", range(4))
    assert not kv.allocate_slots(c, 4)


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    a = make_req("a", range(8))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    assert kv.get_computed_blocks(make_req("b", range(9))) == ([], 0)
