"""OffloadedEngine: an EngineCore whose attention runs on attention shards (the model worker).

The shards' pages follow the request lifecycle: a request's pages are taken at its first
step (RemoteAttentionBackend) and freed when the engine frees its blocks (finished,
cancelled, preempted: EngineCore calls the backend's ``release``, a RemoteKVBackend).
Everything else is EngineCore's.

Constraints it checks at build (each a ValueError naming the field): no prefix caching (a
cached prefix's K/V would be on the model worker, not the shard: planned), no speculative
decoding (rolled-back draft slots would need a truncate on the shard: planned). The engine's
block pool is sized to the shards' total (``CacheConfig.num_blocks``), so its admission and
preemption follow the attention pool; the engine allocates no local KV pages (a one-block
placeholder), so the model worker's batch is bounded by the attention pool's memory.
"""

from __future__ import annotations

import dataclasses

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

    def __init__(self, config: EngineConfig, transport: AttentionTransport, blocks_per_shard: list[int], rotation: int):
        config = offload_config(config, blocks_per_shard)
        self.backend = RemoteAttentionBackend(transport, blocks_per_shard, config.cache.block_size, rotation)
        self.core = EngineCore(config, attention_backend=self.backend)
        self.transport = transport

    def add_request(self, req: Request) -> None:
        self.core.add_request(req)

    def step(self) -> StepResult:
        return self.core.step()

    def abort(self, request_id: str) -> Request | None:
        return self.core.abort(request_id)

    def has_work(self) -> bool:
        return self.core.has_work()
