"""Per-partition block accounting, for K/V that lives in several separate stores.

Attention offload keeps each request's K/V whole on ONE attention shard (partition by
request), each shard with its own block budget. The engine's pool must then account per
shard: a request that grows past its own shard's free blocks cannot borrow another shard's,
so "its shard is full" has to be the event the scheduler already handles as "the pool is
full" (preempt the newest request that competes for the same blocks, or wait), never an
error at step time.

Invariants:
- partition p owns the global block ids [starts[p], starts[p] + sizes[p]); a request's
  blocks all come from one partition, chosen at its first allocation (the partition with the
  most free blocks; ties -> the lowest index) and kept until its blocks are freed (finished,
  aborted, preempted): a preempted request is placed afresh when it is recomputed;
- ``on_place(request_id, partition)`` is called once per placement, before the step that
  first runs the request; ``on_free`` (KVCacheManager's) after its blocks are freed;
- no prefix caching: a cached block would be shared across requests, and so across
  partitions' owners (the offloaded engine refuses it at build).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from engine.kv_cache.block_pool import BlockHash, BlockPool, NoFreeBlocks
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request


class PartitionedBlockPool:
    """Disjoint sub-pools behind one block-id space; the aggregate view (``num_free``,
    ``num_blocks``, ``usage``, ``free``, ``touch``) is what the engine's stats and pin/unpin
    read; allocation names its partition (``allocate_in``)."""

    enable_prefix_caching = False
    prefix_hits = 0
    prefix_queries = 0

    def __init__(self, sizes: list[int]):
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"partition sizes must be a non-empty list of block counts >= 1, got {sizes}")
        self.sizes = list(sizes)
        self.starts = [sum(sizes[:p]) for p in range(len(sizes))]
        self.parts = [BlockPool(n, enable_prefix_caching=False) for n in sizes]
        self.num_blocks = sum(sizes)

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
            p = self.partition_of(b)
            self.parts[p].free([b - self.starts[p]])

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            p = self.partition_of(b)
            self.parts[p].touch([b - self.starts[p]])

    def lookup(self, h: BlockHash) -> int | None:
        return None  # no prefix caching

    def cache(self, block: int, h: BlockHash) -> None:
        return None

    def cached_hashes(self) -> frozenset[BlockHash]:
        return frozenset()


class PartitionedKVCacheManager(KVCacheManager):
    """KVCacheManager whose requests each live in one partition of a PartitionedBlockPool."""

    def __init__(self, pool: PartitionedBlockPool, block_size: int):
        super().__init__(pool, block_size)  # type: ignore[arg-type]  # the same surface, per partition
        self.ppool = pool
        self.partition: dict[str, int] = {}  # request -> its partition, while it holds blocks
        # Called with (request id, partition) when a request is placed (its first allocation)
        self.on_place: Callable[[str, int], None] | None = None

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

    def _place(self) -> int:
        free = [self.ppool.num_free_in(p) for p in range(self.ppool.num_partitions)]
        return max(range(len(free)), key=lambda p: free[p])

    def _take(self, request_id: str, need: int) -> bool:
        """``need`` more blocks for the request in its partition (placing it if new) -> False,
        changing nothing, when that partition cannot supply them."""
        p = self.partition.get(request_id)
        new = p is None
        if new:
            p = self._place()
        if need > self.ppool.num_free_in(p):
            return False
        got = self.ppool.allocate_in(p, need) if need > 0 else []
        self.blocks[request_id] = self.blocks.get(request_id, []) + got
        if new:
            self.partition[request_id] = p
            if self.on_place is not None:
                self.on_place(request_id, p)
        return True

    def allocate(
        self, req: Request, num_new_tokens: int, prefix: tuple[list[int], list[BlockHash]] | None = None
    ) -> bool:
        if prefix is not None and prefix[0]:
            raise ValueError("PartitionedKVCacheManager: prefix caching is not supported (a prefix was passed)")
        held = self.blocks.get(req.request_id, [])
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(held)
        return self._take(req.request_id, need)

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        if request_id in self.blocks:
            raise ValueError(f"reserve: request {request_id!r} already holds blocks")
        if not self._take(request_id, self.blocks_needed(num_tokens)):
            return None
        return list(self.blocks[request_id])

    def free(self, request_id: str) -> None:
        self.partition.pop(request_id, None)
        super().free(request_id)
