"""OffloadedEngine: an EngineCore whose attention runs on attention shards (the model worker).

The shards' pages follow the request lifecycle: a request's pages are taken at its first
step (RemoteAttentionBackend) and freed when the engine frees its blocks (finished,
cancelled, preempted: EngineCore calls the backend's ``release``, a RemoteKVBackend).
Everything else is EngineCore's.

Constraints it checks at build (each a ValueError naming the field): no prefix caching (a
cached prefix's K/V would be on the model worker, not the shard: planned), no speculative
decoding (rolled-back draft slots would need a truncate on the shard: planned). The engine's
block pool is sized to the shards' total (``CacheConfig.num_blocks``) and partitioned per
shard (the backend's ``kv_partitions``): the engine places each request on one shard and its
admission and preemption follow that shard's free blocks, so a full shard means preempt or
wait, as a full local pool does. The engine allocates no local KV pages (a one-block
placeholder), so the model worker's batch is bounded by the attention pool's memory.
"""

from __future__ import annotations

import dataclasses
import time

from attention_offload.remote import RemoteAttentionBackend
from attention_offload.transport import AttentionTransport
from engine.config import EngineConfig
from engine.engine import EngineCore, StepResult
from engine.request import Request


def offload_config(config: EngineConfig, blocks_per_shard: list[int]) -> EngineConfig:
    """``config`` for the model worker: its pool = the shards' total; refuses what offload lacks."""
    if config.cache.enable_prefix_caching:
        raise ValueError("attention offload: CacheConfig.enable_prefix_caching must be False (not supported yet)")
    if config.speculative is not None:
        raise ValueError("attention offload: EngineConfig.speculative must be None (not supported yet)")
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
    ):
        """``keepalive_s``: ``keepalive()`` pings the shards once this long passed without a
        step (set it below the transport's receive timeout); None: it never pings."""
        config = offload_config(config, blocks_per_shard)
        if keepalive_s is not None and not keepalive_s > 0:
            raise ValueError(f"keepalive_s must be > 0 seconds or None, got {keepalive_s}")
        self.backend = RemoteAttentionBackend(transport, blocks_per_shard, config.cache.block_size, rotation)
        self.core = EngineCore(config, attention_backend=self.backend)
        self.transport = transport
        self.keepalive_s = keepalive_s
        # when the shards last heard from us, as seen at a keepalive() call: the transport's
        # bytes sent changed since the previous call (a step, a release, a ping)
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

    def add_request(self, req: Request) -> None:
        self.core.add_request(req)

    def step(self) -> StepResult:
        return self.core.step()

    def abort(self, request_id: str) -> Request | None:
        return self.core.abort(request_id)

    def has_work(self) -> bool:
        return self.core.has_work()
