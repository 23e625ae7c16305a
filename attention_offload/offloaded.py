"""OffloadedEngine: an EngineCore whose attention runs on attention shards (the model worker).

The engine owns the shards' pages: its block pool is sized to the shards' total
(``CacheConfig.num_blocks``) and partitioned per shard (the backend's ``kv_partitions``), and
block ``b`` of partition s IS page ``b`` of shard s (attention_offload/shard.py). The engine
places each request on one shard at its first allocation, and its admission and preemption
follow that shard's free blocks, so a full shard means preempt or wait, as a full local pool
does. Each step sends the shards the step's block tables (RemoteAttentionBackend); nothing is
sent when a request's blocks are freed (finished, cancelled, preempted, rolled back).

What the engine's block ownership gives for free:
- prefix caching (``CacheConfig.enable_prefix_caching``): a cached block is a page on one
  shard, so a request with a cached prefix is placed on that shard when it has room for the
  request (else elsewhere, without the hit: engine/kv_cache/partitioned.py);
- speculative decoding (``EngineConfig.speculative``, n-gram or a draft model, whose own KV
  stays local on the model worker): a verify row set is a sequence with q_len = 1 + k, and a
  rollback is the engine's block-table truncation; the rejected slots are rewritten before
  they are read.

The engine allocates no local KV pages (a one-block placeholder), so the model worker's
batch is bounded by the attention pool's memory. Still refused by EngineCore: tensor
parallelism with a remote attention backend.
"""

from __future__ import annotations

import dataclasses
import time

from attention_offload.remote import RemoteAttentionBackend
from attention_offload.transport import AttentionTransport
from engine.config import EngineConfig
from engine.engine import EngineCore, StepResult
from engine.request import Request
from engine.spec.proposer import Proposer
from engine.spec.smartspec import SpeculationPolicy


def offload_config(config: EngineConfig, blocks_per_shard: list[int]) -> EngineConfig:
    """``config`` for the model worker: its pool = the shards' total."""
    if not blocks_per_shard or any(n < 1 for n in blocks_per_shard):
        raise ValueError(f"blocks_per_shard must be a non-empty list of block counts >= 1, got {blocks_per_shard}")
    cache = dataclasses.replace(config.cache, num_blocks=sum(blocks_per_shard))
    return dataclasses.replace(config, cache=cache)


class OffloadedEngine:
    """The model worker's engine: ``add_request`` / ``step`` / ``abort`` as EngineCore's."""

    def __init__(
        self,
        config: EngineConfig,
        transport: AttentionTransport,
        blocks_per_shard: list[int],
        rotation: int,
        keepalive_s: float | None = None,
        proposer: Proposer | None = None,
        policy: SpeculationPolicy | None = None,
    ):
        """``keepalive_s``: ``keepalive()`` pings the shards once this long passed without a
        step (set it below the transport's receive timeout); None: it never pings.
        ``proposer`` / ``policy``: EngineCore's (speculation; tests inject oracles)."""
        config = offload_config(config, blocks_per_shard)
        if keepalive_s is not None and not keepalive_s > 0:
            raise ValueError(f"keepalive_s must be > 0 seconds or None, got {keepalive_s}")
        self.backend = RemoteAttentionBackend(transport, blocks_per_shard, config.cache.block_size, rotation)
        self.core = EngineCore(config, attention_backend=self.backend, proposer=proposer, policy=policy)
        self.transport = transport
        self.keepalive_s = keepalive_s
        # when the shards last heard from us, as seen at a keepalive() call: the transport's
        # bytes sent changed since the previous call (a step, a ping)
        self._last_contact, self._sent = time.monotonic(), self._bytes_sent()
        self.pings = 0

    def _bytes_sent(self) -> int:
        c = self.transport.counters
        return c.control + c.payload_out

    def keepalive(self) -> bool:
        """Call between steps, from the thread that steps (the engine loop's idle tick), often
        (every few ms): pings the shards when ``keepalive_s`` passed without a message to them
        -> whether it pinged."""
        if self.keepalive_s is None:
            return False
        now, sent = time.monotonic(), self._bytes_sent()
        if sent != self._sent:
            self._last_contact, self._sent = now, sent
            return False
        if now - self._last_contact < self.keepalive_s:
            return False
        self.transport.ping()
        self._last_contact, self._sent = now, self._bytes_sent()
        self.pings += 1
        return True

    def shard_of(self, request_id: str) -> int | None:
        """The shard holding the request's pages (None: it holds no blocks now)."""
        return self.core.kv.partition_of(request_id)

    def used_blocks(self) -> list[int]:
        """Per shard: blocks in use (referenced by a request); cached blocks no request holds
        are reusable and count as free."""
        pool = self.core.pool
        return [n - pool.num_free_in(s) for s, n in enumerate(pool.sizes)]

    @property
    def capacity(self) -> list[int]:
        """Per shard: its pages (the engine's sub-pool sizes)."""
        return list(self.core.pool.sizes)

    def add_request(self, req: Request) -> None:
        self.core.add_request(req)

    def step(self) -> StepResult:
        return self.core.step()

    def abort(self, request_id: str) -> Request | None:
        return self.core.abort(request_id)

    def has_work(self) -> bool:
        return self.core.has_work()
