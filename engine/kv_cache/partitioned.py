"""Per-partition block accounting, for K/V that lives in several separate stores.

Attention offload keeps each request's K/V whole on ONE attention shard (partition by
request), each shard with its own block budget, and the shard's pages are addressed by this
pool's block ids (partition p's blocks are page ids 0.. of shard p). The engine's pool must
then account per shard: a request that grows past its own shard's free blocks cannot borrow
another shard's, so "its shard is full" has to be the event the scheduler already handles as
"the pool is full" (preempt the newest request that competes for the same blocks, or wait),
never an error at step time.

Invariants:
- partition p owns the global block ids [starts[p], starts[p] + sizes[p]); a request's
  blocks all come from one partition, chosen at its first allocation and kept until its
  blocks are freed (finished, aborted, preempted): a preempted request is placed afresh when
  it is recomputed;
- prefix caching is per partition: a cached block is content on one store, so only a
  request placed in that partition can share it. A new request goes to the partition holding
  the longest cached prefix of it among those with room for its known tokens (ties: more
  room left, then the lowest index); when none with a hit has room it goes to the partition
  with the most free blocks, with that partition's hit if it has one, else without any
  (``computed_prefix``); a request without a hit: the most free blocks (ties: lowest index);
- a block's hash is evicted when the block is handed out again (BlockPool), so a hit always
  names a page holding exactly that content.
"""

from __future__ import annotations

import bisect

from engine.kv_cache.block_pool import BlockHash, BlockPool, NoFreeBlocks
from engine.kv_cache.manager import KVCacheManager, prefix_block_hashes
from engine.request import Request


class PartitionedBlockPool:
    """Disjoint sub-pools behind one block-id space; the aggregate view (``num_free``,
    ``num_blocks``, ``usage``, ``free``, ``touch``, ``cache``, ``cached_hashes``) is what the
    engine's stats, pin/unpin and KV manager read; allocation and prefix lookup name their
    partition (``allocate_in``, ``match``)."""

    def __init__(self, sizes: list[int], enable_prefix_caching: bool = False):
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"partition sizes must be a non-empty list of block counts >= 1, got {sizes}")
        self.sizes = list(sizes)
        self.starts = [sum(sizes[:p]) for p in range(len(sizes))]
        self.enable_prefix_caching = enable_prefix_caching
        self.parts = [BlockPool(n, enable_prefix_caching) for n in sizes]
        self.num_blocks = sum(sizes)
        self.prefix_hits = 0  # blocks reused from the prefix cache (metrics, as BlockPool's)
        self.prefix_queries = 0  # blocks looked up in the chosen partition's cache

    @property
    def num_partitions(self) -> int:
        return len(self.parts)

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.parts)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def ref_counts(self) -> list[int]:
        """Per global block id (a copy: read-only view for checks)."""
        return [c for p in self.parts for c in p.ref_counts]

    def num_free_in(self, partition: int) -> int:
        return self.parts[partition].num_free

    def partition_of(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} is outside the pool's {self.num_blocks} blocks")
        return bisect.bisect_right(self.starts, block) - 1

    def _local(self, block: int) -> tuple[BlockPool, int]:
        p = self.partition_of(block)
        return self.parts[p], block - self.starts[p]

    def allocate_in(self, partition: int, n: int) -> list[int]:
        """``n`` blocks of ``partition`` (global ids). Raises NoFreeBlocks past its free count."""
        base = self.starts[partition]
        try:
            return [base + b for b in self.parts[partition].allocate(n)]
        except NoFreeBlocks as e:
            raise NoFreeBlocks(f"partition {partition}: {e}") from None

    def allocate(self, n: int) -> list[int]:
        raise TypeError("PartitionedBlockPool.allocate: blocks come from a partition, use allocate_in(partition, n)")

    def free(self, blocks: list[int]) -> None:
        for b in blocks:  # one by one: keeps each sub-pool's free-list order
            pool, local = self._local(b)
            pool.free([local])

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            pool, local = self._local(b)
            pool.touch([local])

    def is_referenced(self, block: int) -> bool:
        pool, local = self._local(block)
        return pool.ref_counts[local] > 0

    def match(self, partition: int, hashes: list[BlockHash]) -> list[int]:
        """The global ids of ``partition``'s cached blocks for the longest prefix of the
        chained ``hashes`` (not counted in the metrics)."""
        out, base = [], self.starts[partition]
        for h in hashes:
            b = self.parts[partition].peek(h)
            if b is None:
                break
            out.append(base + b)
        return out

    def count_lookup(self, hits: int, looked_up: int) -> None:
        self.prefix_hits += hits
        self.prefix_queries += looked_up

    def lookup(self, h: BlockHash) -> int | None:
        raise TypeError("PartitionedBlockPool.lookup: a cached block lives in one partition, use match(partition, ...)")

    def cache(self, block: int, h: BlockHash) -> None:
        pool, local = self._local(block)
        pool.cache(local, h)

    def cached_hashes(self) -> frozenset[BlockHash]:
        return frozenset().union(*(p.cached_hashes() for p in self.parts))


class PartitionedKVCacheManager(KVCacheManager):
    """KVCacheManager whose requests each live in one partition of a PartitionedBlockPool."""

    def __init__(self, pool: PartitionedBlockPool, block_size: int):
        super().__init__(pool, block_size)  # type: ignore[arg-type]  # the same surface, per partition
        self.ppool = pool
        self.partition: dict[str, int] = {}  # request -> its partition, while it holds blocks

    @property
    def max_blocks_per_request(self) -> int:
        """The smallest partition: a request placed anywhere can always grow to this."""
        return min(self.ppool.sizes)

    def shares_pool(self, a: str, b: str) -> bool:
        """Whether freeing ``a``'s blocks can give ``b`` room: both placed in one partition."""
        pa = self.partition.get(a)
        return pa is not None and pa == self.partition.get(b)

    def partition_of(self, request_id: str) -> int | None:
        return self.partition.get(request_id)

    def _most_free(self) -> int:
        free = [self.ppool.num_free_in(p) for p in range(self.ppool.num_partitions)]
        return max(range(len(free)), key=lambda p: free[p])

    def computed_prefix(self, req: Request) -> tuple[list[int], list[BlockHash]]:
        """The cached blocks of the partition the request should go to (module docstring:
        the longest hit among partitions with room for its known tokens, else the most free
        partition's hit, possibly none). The blocks name the partition for ``allocate``;
        none: the most free partition."""
        hashes = prefix_block_hashes(req.all_token_ids, self.block_size)
        if not self.ppool.enable_prefix_caching or not hashes:
            return [], []
        whole = self.blocks_needed(req.num_tokens)
        best: tuple[int, int, int] | None = None  # (hit blocks, room left after it, -partition)
        hits: dict[int, list[int]] = {}
        for p in range(self.ppool.num_partitions):
            blocks = hits[p] = self.ppool.match(p, hashes)
            revived = sum(1 for b in blocks if not self.ppool.is_referenced(b))
            room = self.ppool.num_free_in(p) - (whole - len(blocks) + revived)
            candidate = (len(blocks), room, -p)
            if blocks and room >= 0 and (best is None or candidate > best):
                best = candidate
        chosen = hits[-best[2]] if best is not None else hits[self._most_free()]
        self.ppool.count_lookup(len(chosen), len(chosen) + (len(chosen) < len(hashes)))
        return chosen, hashes[: len(chosen)]

    def _take(self, request_id: str, need: int, placed: int | None = None) -> bool:
        """``need`` more blocks for the request in its partition (placing it in ``placed``, else
        the most free one, if new) -> False, changing nothing, when that partition cannot
        supply them."""
        p = self.partition.get(request_id)
        if p is None:
            p = self._most_free() if placed is None else placed
        if need > self.ppool.num_free_in(p):
            return False
        got = self.ppool.allocate_in(p, need) if need > 0 else []
        self.blocks[request_id] = self.blocks.get(request_id, []) + got
        self.partition[request_id] = p
        return True

    def allocate(
        self, req: Request, num_new_tokens: int, prefix: tuple[list[int], list[BlockHash]] | None = None
    ) -> bool:
        rid = req.request_id
        held = self.blocks.get(rid, [])
        cached = prefix[0] if prefix and not held else []
        if not cached:
            need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(held)
            return self._take(rid, need)
        if rid in self.partition:
            raise ValueError(f"allocate: request {rid!r} is placed in partition {self.partition[rid]} without blocks")
        p = self.ppool.partition_of(cached[0])  # the hit's partition: the request goes there
        if any(self.ppool.partition_of(b) != p for b in cached):
            raise ValueError(f"allocate: prefix blocks {cached} span several partitions")
        total = max(req.num_computed_tokens, len(cached) * self.block_size) + num_new_tokens
        need = self.blocks_needed(total) - len(cached)
        revived = sum(1 for b in cached if not self.ppool.is_referenced(b))
        if need + revived > self.ppool.num_free_in(p):
            return False
        self.ppool.touch(cached)
        self._hashes[rid] = list(prefix[1])
        self.blocks[rid] = list(cached) + (self.ppool.allocate_in(p, need) if need > 0 else [])
        self.partition[rid] = p
        return True

    def reserve(self, request_id: str, num_tokens: int, partition: int | None = None) -> list[int] | None:
        """Fresh blocks in ``partition`` (None: the most free one); None when it has no room now.
        A caller that must know the partition before blocks are free (a transfer whose KV goes
        straight to that partition's store: decode_worker/attention_receiver.py) names it."""
        if request_id in self.blocks:
            raise ValueError(f"reserve: request {request_id!r} already holds blocks")
        if partition is not None and not 0 <= partition < self.ppool.num_partitions:
            raise ValueError(f"reserve: partition {partition} is not in [0, {self.ppool.num_partitions})")
        if not self._take(request_id, self.blocks_needed(num_tokens), partition):
            return None
        return list(self.blocks[request_id])

    def free(self, request_id: str) -> None:
        self.partition.pop(request_id, None)
        super().free(request_id)
