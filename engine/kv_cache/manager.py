"""KVCacheManager: which blocks each request holds, prefix-cache lookup and hashing.

A request's block list covers its first ``len(blocks) * block_size`` token positions. Full
blocks whose K/V are computed get a hash chained on their parent's hash, so equal prefixes
map to equal hashes and can be shared (ref-counted) by later requests.
"""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockHash, BlockPool
from engine.request import Request

# Parent hash of a request's first block. An int, not None: hash(None) is address-based
# before Python 3.12, which made the whole chain differ from process to process.
_ROOT_HASH: BlockHash = 0x5EED


def hash_block(parent: BlockHash | None, tokens: tuple[int, ...]) -> BlockHash:
    # Python's hash of a tuple of ints is deterministic across processes (no str hashing).
    return hash((_ROOT_HASH if parent is None else parent, tokens))


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[BlockHash]:
    """The chained hashes of the full blocks a prefix-cache lookup of ``token_ids`` can hit:
    every full block except one that would leave no token to compute (a step must produce
    logits). The router hashes prompts with this to route by cached prefix."""
    hashes: list[BlockHash] = []
    parent = None
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}  # hashes of a request's cached full blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def max_blocks_per_request(self) -> int:
        """The most blocks one request can ever hold: the whole pool (a partitioned manager:
        one partition)."""
        return self.pool.num_blocks

    def shares_pool(self, a: str, b: str) -> bool:
        """Whether freeing request ``a``'s blocks can give request ``b`` room: always, with one
        pool (a partitioned manager: only when both live in one partition)."""
        return True

    def computed_prefix(self, req: Request) -> tuple[list[int], list[BlockHash]]:
        """Cached blocks matching the longest full-block prefix of the request's tokens.

        Leaves at least one token uncomputed so the step produces logits for sampling.
        """
        blocks, hashes = [], []
        for h in prefix_block_hashes(req.all_token_ids, self.block_size):
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return blocks, hashes

    def allocate(
        self, req: Request, num_new_tokens: int, prefix: tuple[list[int], list[BlockHash]] | None = None
    ) -> bool:
        """Ensure blocks for ``num_computed_tokens + num_new_tokens`` positions.

        ``prefix`` (from computed_prefix) is adopted first for a request with no blocks.
        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        held = self.blocks.get(req.request_id, [])
        prefix_blocks = prefix[0] if prefix and not held else []
        total = max(req.num_computed_tokens, len(prefix_blocks) * self.block_size) + num_new_tokens
        need = self.blocks_needed(total) - len(held) - len(prefix_blocks)
        revived = sum(1 for b in prefix_blocks if self.pool.ref_counts[b] == 0)
        if need + revived > self.pool.num_free:
            return False
        if prefix_blocks:
            self.pool.touch(prefix_blocks)
            held = list(prefix_blocks)
            self._hashes[req.request_id] = list(prefix[1])
        self.blocks[req.request_id] = held + (self.pool.allocate(need) if need > 0 else [])
        return True

    def reserve(self, request_id: str, num_tokens: int, partition: int | None = None) -> list[int] | None:
        """Allocate fresh blocks for ``num_tokens`` positions of a request arriving by transfer.
        ``partition``: only a partitioned pool has any (PartitionedKVCacheManager)."""
        if partition is not None:
            raise ValueError(f"reserve: partition {partition} given, but this KV pool is not partitioned")
        need = self.blocks_needed(num_tokens)
        if need > self.pool.num_free:
            return None
        self.blocks[request_id] = self.pool.allocate(need)
        return list(self.blocks[request_id])

    def cache_full_blocks(self, req: Request) -> None:
        """Hash and publish the request's blocks that are full and fully computed."""
        if not self.pool.enable_prefix_caching:
            return
        blocks = self.blocks.get(req.request_id, [])
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        n_full = min(req.num_computed_tokens // bs, len(blocks))
        if n_full <= len(hashes):
            return
        tokens = req.all_token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), n_full):
            parent = hash_block(parent, tuple(tokens[i * bs : (i + 1) * bs]))
            hashes.append(parent)
            self.pool.cache(blocks[i], parent)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Keep only the blocks covering positions [0, num_tokens); free those past them.

        Speculative rollback: the slots of rejected draft tokens are past the request's
        computed tokens; blocks holding only such slots go back to the pool (a block that
        also holds kept positions stays and its rejected slots are overwritten by later
        tokens). A cached (hashed) block is never past the computed tokens: dropping one is
        a bug and raises.
        """
        blocks = self.blocks.get(request_id)
        if blocks is None:
            raise KeyError(f"truncate: request {request_id!r} holds no blocks")
        keep = self.blocks_needed(num_tokens)
        if len(blocks) <= keep:
            return
        if len(self._hashes.get(request_id, ())) > keep:
            raise RuntimeError(
                f"truncate: request {request_id!r} to {num_tokens} tokens would drop cached blocks "
                f"({len(self._hashes[request_id])} cached, keeping {keep})"
            )
        dropped = blocks[keep:]
        del blocks[keep:]
        self.pool.free(list(reversed(dropped)))

    def free(self, request_id: str) -> None:
        blocks = self.blocks.pop(request_id, [])
        self._hashes.pop(request_id, None)
        self.pool.free(list(reversed(blocks)))

    def block_ids(self, request_id: str) -> list[int]:
        return self.blocks.get(request_id, [])
