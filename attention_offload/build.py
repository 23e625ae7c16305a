"""Building the pieces from an EngineConfig: the shards' KV layout, shards, and a model
worker over in-process (loopback) shards."""

from __future__ import annotations

from attention_offload.offloaded import OffloadedEngine
from attention_offload.shard import AttentionShard
from attention_offload.transport import LoopbackTransport
from engine.config import EngineConfig
from engine.kv_cache.layout import KVLayout


def shard_layout(config: EngineConfig) -> KVLayout:
    """The KV geometry every shard of ``config``'s model holds (whole heads, every layer)."""
    mc = config.model
    return KVLayout(config.dtype, config.cache.block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim)


def build_shard(config: EngineConfig, num_blocks: int, backend: str = "auto") -> AttentionShard:
    return AttentionShard(shard_layout(config), num_blocks, config.device, backend, config.model.sliding_window)


def build_loopback(
    config: EngineConfig, blocks_per_shard: list[int], rotation: int = 2, threaded: bool = True, backend: str = "auto"
) -> OffloadedEngine:
    """A model worker whose shards live in this process (tests, one-machine benchmarks)."""
    shards = [build_shard(config, n, backend) for n in blocks_per_shard]
    return OffloadedEngine(config, LoopbackTransport(shards, threaded), blocks_per_shard, rotation)
