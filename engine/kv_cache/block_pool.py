"""Block pool: free list, reference counts and the prefix-cache hash map. No torch.

Invariants:
- every block id in [0, num_blocks) is either referenced (ref_count > 0) or in ``_free``;
- a block in ``_free`` may still carry a prefix hash: it is reusable by a later request with
  the same prefix until it is handed out to someone else (then its hash is evicted);
- ``_free`` is ordered oldest-freed first, so allocation evicts the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict

BlockHash = int


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}  # hash -> block holding that content
        self.prefix_hits = 0  # blocks reused from the prefix cache (metrics)
        self.prefix_queries = 0  # blocks looked up in the prefix cache (metrics)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free, including evictable cached ones)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (ref_count 1 each), evicting the oldest cached content first."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (prefix hit); revives them from the free list."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference per block; blocks reaching zero go to the tail of the free list.

        Callers pass a request's blocks in reverse order so its tail (least shareable)
        blocks are evicted before its prefix.
        """
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def lookup(self, h: BlockHash) -> int | None:
        """Block holding content with hash ``h``, if cached."""
        if not self.enable_prefix_caching:
            return None
        self.prefix_queries += 1
        b = self._cached.get(h)
        if b is not None:
            self.prefix_hits += 1
        return b

    def peek(self, h: BlockHash) -> int | None:
        """``lookup`` without counting it (a partitioned pool compares its sub-pools first)."""
        return self._cached.get(h) if self.enable_prefix_caching else None

    def cache(self, block: int, h: BlockHash) -> None:
        """Record that ``block`` is full and holds the content identified by ``h``."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        self.block_hash[block] = h
        self._cached.setdefault(h, block)

    def cached_hashes(self) -> frozenset[BlockHash]:
        """Hashes of every cached full block (in use or evictable)."""
        return frozenset(self._cached)

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self._cached.get(h) == b:
                del self._cached[h]
            self.block_hash[b] = None
