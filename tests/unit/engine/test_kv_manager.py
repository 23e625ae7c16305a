"""KVCacheManager: block accounting per request, prefix hash chain, reserve, no-change on failure."""

from __future__ import annotations

import os
import subprocess
import sys

from engine.kv_cache import manager
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager, hash_block
from engine.request import Request, SamplingParams

BS = 4


def make(num_blocks: int = 16, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, caching), BS)


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def compute(kv: KVCacheManager, r: Request, n: int | None = None) -> None:
    """Pretend a step computed ``n`` (default: all remaining) tokens of ``r``."""
    n = r.num_tokens - r.num_computed_tokens if n is None else n
    assert kv.allocate(r, n)
    r.num_computed_tokens += n
    kv.cache_full_blocks(r)


def snapshot(kv: KVCacheManager):
    p = kv.pool
    return (
        {k: list(v) for k, v in kv.blocks.items()},
        {k: list(v) for k, v in kv._hashes.items()},
        list(p.ref_counts),
        list(p._free),
        dict(p._cached),
        list(p.block_hash),
    )


def test_blocks_needed():
    kv = make()
    assert [kv.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_block_list_incrementally():
    kv = make()
    r = req("a", range(10))
    assert kv.allocate(r, 6)
    assert len(kv.block_ids("a")) == 2
    r.num_computed_tokens = 6
    assert kv.allocate(r, 2)  # positions 6, 7: still block 1
    assert len(kv.block_ids("a")) == 2
    r.num_computed_tokens = 8
    assert kv.allocate(r, 2)
    assert len(kv.block_ids("a")) == 3
    assert kv.pool.num_free == 13


def test_hash_chain_depends_on_whole_prefix():
    a = hash_block(None, (1, 2, 3, 4))
    assert a == hash_block(None, (1, 2, 3, 4))
    assert hash_block(a, (5, 6, 7, 8)) != hash_block(None, (5, 6, 7, 8))
    assert hash_block(a, (5, 6, 7, 8)) != hash_block(hash_block(None, (0, 2, 3, 4)), (5, 6, 7, 8))


def test_hash_is_stable_across_processes():
    """Prefix hashes may be compared between workers, so they must not depend on the process."""
    # a bare ``engine`` package object skips engine/__init__ (torch import): seconds saved
    code = (
        "import sys, types; pkg = types.ModuleType('engine'); pkg.__path__ = [sys.argv[1]];"
        "sys.modules['engine'] = pkg;"
        "from engine.kv_cache.manager import hash_block as h;"
        "print(h(h(None, (1, 2, 3, 4)), (5, 6, 7, 8)))"
    )
    engine_dir = os.path.dirname(os.path.dirname(manager.__file__))
    cmd = [sys.executable, "-c", code, engine_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out == f"{hash_block(hash_block(None, (1, 2, 3, 4)), (5, 6, 7, 8))}\n"


def test_cache_full_blocks_hashes_only_full_computed_blocks():
    kv = make()
    r = req("a", range(10))
    compute(kv, r, 6)  # block 0 full, block 1 half
    assert len(kv._hashes["a"]) == 1
    h0 = kv._hashes["a"][0]
    assert h0 == hash_block(None, (0, 1, 2, 3))
    assert kv.pool.block_hash[kv.block_ids("a")[0]] == h0
    assert kv.pool.block_hash[kv.block_ids("a")[1]] is None
    compute(kv, r)  # positions 6..9: block 1 full, block 2 partial
    assert kv._hashes["a"] == [h0, hash_block(h0, (4, 5, 6, 7))]
    kv.cache_full_blocks(r)  # idempotent
    assert len(kv._hashes["a"]) == 2


def test_computed_prefix_finds_longest_chain_and_leaves_one_token():
    kv = make()
    a = req("a", range(12))
    compute(kv, a)  # 3 full blocks cached
    # same 12 tokens: only 2 blocks may come from the cache, the last token must be computed
    b = req("b", range(12))
    blocks, hashes = kv.computed_prefix(b)
    assert blocks == kv.block_ids("a")[:2] and hashes == kv._hashes["a"][:2]
    # longer prompt: all 3 blocks
    assert kv.computed_prefix(req("c", range(13)))[0] == kv.block_ids("a")
    # a different first block breaks the chain even though block 1's tokens match
    assert kv.computed_prefix(req("d", [99, 1, 2, 3, *range(4, 12)]))[0] == []
    # divergence in block 1 keeps block 0
    assert kv.computed_prefix(req("e", [0, 1, 2, 3, 4, 99, 6, 7, 8]))[0] == kv.block_ids("a")[:1]
    # tiny prompts never hit
    assert kv.computed_prefix(req("f", [0, 1, 2, 3]))[0] == []


def test_allocate_with_prefix_shares_blocks():
    kv = make(8)
    a = req("a", range(9))
    compute(kv, a)  # blocks: 2 full (cached) + 1 partial
    b = req("b", [*range(8), 42, 43])
    prefix = kv.computed_prefix(b)
    assert len(prefix[0]) == 2
    assert kv.allocate(b, 2, prefix)
    shared = kv.block_ids("b")[:2]
    assert shared == kv.block_ids("a")[:2]
    assert [kv.pool.ref_counts[x] for x in shared] == [2, 2]
    assert len(kv.block_ids("b")) == 3 and kv.block_ids("b")[2] not in kv.block_ids("a")
    kv.free("a")
    assert [kv.pool.ref_counts[x] for x in shared] == [1, 1]
    kv.free("b")
    assert kv.pool.num_free == 8


def test_prefix_revived_from_free_list_counts_against_free_blocks():
    kv = make(4)
    a = req("a", range(9))
    compute(kv, a)  # 3 blocks
    kv.free("a")  # all free, 2 still cached
    b = req("b", [*range(8), *range(100, 108)])  # needs 2 cached + 2 new = whole pool
    prefix = kv.computed_prefix(b)
    assert len(prefix[0]) == 2
    assert kv.allocate(b, 8, prefix)
    assert kv.pool.num_free == 0
    assert kv.block_ids("b")[:2] == prefix[0]


def test_failed_allocate_changes_nothing():
    kv = make(4)
    a = req("a", range(9))
    compute(kv, a)  # holds 3 blocks, 2 cached
    b = req("b", range(100, 109))
    before = snapshot(kv)
    assert not kv.allocate(b, 9)  # needs 3, 1 free
    assert snapshot(kv) == before
    # with a prefix: 2 shared blocks + 2 new > 1 free
    kv.free("a")
    c = req("c", [*range(8), *range(200, 216)])
    prefix = kv.computed_prefix(c)
    assert len(prefix[0]) == 2
    hog = req("hog", range(300, 304))
    assert kv.allocate(hog, 4)  # takes the uncached block (oldest free: a's tail)
    before = snapshot(kv)
    assert not kv.allocate(c, 16, prefix)  # 2 revived + 4 new > 3 free
    assert snapshot(kv) == before
    assert "c" not in kv.blocks


def test_reserve():
    kv = make(4)
    blocks = kv.reserve("x", 9)
    assert blocks is not None and len(blocks) == 3
    assert kv.block_ids("x") == blocks
    before = snapshot(kv)
    assert kv.reserve("y", 5) is None  # needs 2, 1 free
    assert snapshot(kv) == before
    kv.free("x")
    assert kv.pool.num_free == 4


def test_free_releases_tail_first():
    kv = make(4)
    a = req("a", range(12))
    compute(kv, a)
    blocks = kv.block_ids("a")
    kv.free("a")
    assert kv.block_ids("a") == [] and "a" not in kv._hashes
    # the tail block is evicted first, the prefix block last
    assert kv.pool.allocate(1) == [3]  # the never-used block was freed longest ago
    assert kv.pool.allocate(3) == list(reversed(blocks))


def test_prefix_caching_disabled_never_hits():
    kv = make(8, caching=False)
    a = req("a", range(9))
    compute(kv, a)
    assert kv._hashes.get("a", []) == []
    assert kv.computed_prefix(req("b", range(9))) == ([], [])
