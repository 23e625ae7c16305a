"""BlockPool: allocation, reference counts, double free, prefix-hash map and LRU eviction."""

from __future__ import annotations

import pytest

from engine.kv_cache.block_pool import BlockPool, NoFreeBlocks


def test_allocate_gives_distinct_blocks_with_one_reference():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert all(pool.ref_counts[x] == 1 for x in a + b)
    assert pool.num_free == 0 and pool.usage == 1.0
    assert pool.allocate(0) == []


def test_allocate_too_many_raises_and_changes_nothing():
    pool = BlockPool(4)
    held = pool.allocate(3)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    assert pool.num_free == 1
    assert [pool.ref_counts[b] for b in held] == [1, 1, 1]
    assert pool.allocate(1) == [b for b in range(4) if b not in held]  # the last block is still there


def test_free_returns_blocks_and_double_free_raises():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free == 4
    assert all(rc == 0 for rc in pool.ref_counts)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([blocks[0]])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([3])  # never allocated


def test_shared_block_is_free_only_after_last_reference():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.touch([b])  # second holder
    assert pool.ref_counts[b] == 2
    pool.free([b])
    assert pool.ref_counts[b] == 1 and pool.num_free == 3
    pool.free([b])
    assert pool.ref_counts[b] == 0 and pool.num_free == 4


def test_cache_and_lookup():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    assert pool.lookup(123) is None
    pool.cache(b, 123)
    assert pool.lookup(123) == b
    assert pool.block_hash[b] == 123
    assert (pool.prefix_queries, pool.prefix_hits) == (2, 1)
    pool.cache(b, 456)  # a block's content never changes while it is held: first hash stays
    assert pool.block_hash[b] == 123 and pool.lookup(456) is None


def test_cached_block_survives_free_and_is_revived_by_touch():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.cache(b, 7)
    pool.free([b])
    assert pool.num_free == 4  # evictable, so it counts as free
    assert pool.lookup(7) == b  # ... but its content is still findable
    pool.touch([b])
    assert pool.ref_counts[b] == 1 and pool.num_free == 3
    assert b not in pool.allocate(3)  # revived block left the free list


def test_lru_eviction_order_and_hash_removal():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.cache(b, 100 + i)
    # freed in this order: blocks[3] is least recently used, blocks[0] most recently
    pool.free([blocks[3], blocks[2], blocks[1], blocks[0]])
    (first,) = pool.allocate(1)
    assert first == blocks[3]
    assert pool.lookup(103) is None  # its content was evicted with the reuse
    assert pool.block_hash[first] is None
    assert [pool.lookup(100 + i) for i in range(3)] == blocks[:3]
    (second,) = pool.allocate(1)
    assert second == blocks[2] and pool.lookup(102) is None
    # touching a free cached block moves it out of the eviction order entirely
    pool.touch([blocks[1]])
    assert pool.allocate(1) == [blocks[0]]
    assert pool.lookup(101) == blocks[1]


def test_duplicate_content_keeps_first_block_until_it_is_evicted():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, 9)
    pool.cache(b, 9)  # same content computed twice (two requests in the same step)
    assert pool.lookup(9) == a
    pool.free([b])
    pool.allocate(2)  # evicts b (and the never-used block): a's mapping must survive
    assert pool.lookup(9) == a
    pool.free([a])
    pool.allocate(1)
    assert pool.lookup(9) is None


def test_prefix_caching_disabled():
    pool = BlockPool(2, enable_prefix_caching=False)
    (b,) = pool.allocate(1)
    pool.cache(b, 5)
    assert pool.block_hash[b] is None
    assert pool.lookup(5) is None
    assert pool.prefix_queries == 0


def test_invalid_size():
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)
