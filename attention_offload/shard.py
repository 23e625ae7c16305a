"""AttentionShard: one attention worker's part of the decode KV cache and its batched attention.

Partitioning is by request: a shard holds every layer's K/V of every request placed on it,
whole. Attention of a request then needs nothing from any other shard (no cross-shard
softmax reduction), a shard's capacity is a plain block count (admission is per shard), and
it works for any KV-head count: SmolLM2-135M has 3 KV heads, which 2 shards cannot split
evenly by head group.

Lifecycle of a sequence (``seq_id``, an int the model worker assigns to a request):

    begin(batch) with the sequence's first tokens (context start 0)  -> blocks allocated
    begin(batch) per later step: context start == tokens already held -> blocks grown
    release(seq_id)  (finished, cancelled or preempted)              -> blocks freed

A batch context (``ShardBatch.ctx``) lives from ``begin`` until ``attend`` of the last layer.
Each step's K/V are written layer by layer by ``attend`` (the engine's attention backend
stores them at the slots ``begin`` planned). The shard never guesses: a context start that
disagrees with what it holds, an unknown context or a full pool is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionMetadata
from engine.engine import make_attention_backend
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache


class AttentionShardFull(RuntimeError):
    """The shard's pool cannot hold a sequence's next tokens (the model worker's accounting
    of this shard should have prevented it)."""


@dataclass(frozen=True)
class ShardBatch:
    """One micro-batch's sequences on one shard, in query-row order: sequence i has
    ``q_lens[i]`` new tokens at the end of ``seq_lens[i]`` tokens of context. A micro-batch
    with none of its requests here is an empty batch (every shard hears of every micro-batch,
    so a shard's serve loop knows the order of the step's ATTENDs without a header each)."""

    ctx: int  # the batch context id, unique among the shard's live contexts
    seq_ids: list[int]
    seq_lens: list[int]
    q_lens: list[int]
    micro_batch: tuple[int, int] = (0, 1)  # (index, count) in the step (AttentionMetadata.micro_batch)
    width: int = 0  # q|k|v row width, (H + 2 Hkv) D, of the packed ATTEND tensors

    def __post_init__(self) -> None:
        n = len(self.seq_ids)
        if len(self.seq_lens) != n or len(self.q_lens) != n:
            raise ValueError(f"ShardBatch {self.ctx}: seq_ids, seq_lens, q_lens must be equal-length lists")
        i, count = self.micro_batch
        if not 0 <= i < count:
            raise ValueError(f"ShardBatch {self.ctx}: micro_batch {self.micro_batch} is not (index < count)")
        if any(q < 1 or q > s for q, s in zip(self.q_lens, self.seq_lens, strict=True)):
            raise ValueError(f"ShardBatch {self.ctx}: need 1 <= q_len <= seq_len, got {self.q_lens} / {self.seq_lens}")

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)


@dataclass(frozen=True)
class ShardStats:
    free_blocks: int
    total_blocks: int
    sequences: int  # sequences holding blocks


class AttentionShard:
    """Owns ``num_blocks`` pages of every layer (``PagedKVCache``), a block pool without
    prefix caching, and an engine attention backend (``kind``: "sdpa", "triton", "auto")."""

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        sliding_window: int | None = None,
    ):
        self.layout = layout
        self.cache = PagedKVCache(layout, num_blocks, device)
        self.pool = BlockPool(num_blocks, enable_prefix_caching=False)
        self.backend = make_attention_backend(backend, self.cache, sliding_window)
        self._blocks: dict[int, list[int]] = {}  # seq_id -> its pages, in token order
        self._tokens: dict[int, int] = {}  # seq_id -> tokens whose K/V are (being) written
        self._ctx: dict[int, AttentionMetadata] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def stats(self) -> ShardStats:
        return ShardStats(self.pool.num_free, self.pool.num_blocks, len(self._blocks))

    def begin(self, batch: ShardBatch) -> None:
        """Grow each sequence's pages to ``seq_len`` tokens and plan the context's metadata
        (an empty batch opens no context)."""
        if not batch.seq_ids:
            return
        if batch.ctx in self._ctx:
            raise ValueError(f"attention shard: batch context {batch.ctx} is already live")
        bs = self.layout.block_size
        need = 0
        for sid, seq_len, q_len in zip(batch.seq_ids, batch.seq_lens, batch.q_lens, strict=True):
            held = self._tokens.get(sid, 0)
            if seq_len - q_len != held:
                raise ValueError(
                    f"attention shard: sequence {sid} continues at token {seq_len - q_len} but the shard holds {held}"
                )
            need += -(-seq_len // bs) - len(self._blocks.get(sid, ()))
        if need > self.pool.num_free:
            raise AttentionShardFull(
                f"attention shard: batch {batch.ctx} needs {need} blocks, {self.pool.num_free} free"
            )
        slots, tables = [], []
        for sid, seq_len, q_len in zip(batch.seq_ids, batch.seq_lens, batch.q_lens, strict=True):
            blocks = self._blocks.setdefault(sid, [])
            grow = -(-seq_len // bs) - len(blocks)
            if grow > 0:
                blocks.extend(self.pool.allocate(grow))
            self._tokens[sid] = seq_len
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(seq_len - q_len, seq_len))
            tables.append(blocks)
        width = max(len(t) for t in tables)
        dev = self.cache.kv.device
        qsl = [0]
        for q in batch.q_lens:
            qsl.append(qsl[-1] + q)
        self._ctx[batch.ctx] = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=qsl,
            seq_lens=list(batch.seq_lens),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long),
        )

    def rows(self, ctx: int) -> int:
        """Query rows of a live context (its ATTEND tensors' first dim)."""
        meta = self._ctx.get(ctx)
        if meta is None:
            raise ValueError(f"attention shard: unknown batch context {ctx}")
        return meta.query_start_loc[-1]

    def attend(self, ctx: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [n, H, D], k/v: [n, Hkv, D] (the context's new tokens, in row order) -> [n, H, D].
        Writes k/v into the pages; the last layer ends the context."""
        meta = self._ctx.get(ctx)
        if meta is None:
            raise ValueError(f"attention shard: unknown batch context {ctx} (layer {layer})")
        if q.shape[0] != meta.query_start_loc[-1]:
            raise ValueError(f"attention shard: context {ctx} has {meta.query_start_loc[-1]} rows, got {q.shape[0]}")
        out = self.backend.forward(layer, q, k, v, meta)
        if layer == self.layout.num_layers - 1:
            del self._ctx[ctx]
        return out

    def attend_packed(self, ctx: int, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [n, (H + 2 Hkv) D] (q | k | v per row, the wire form) -> [n, H * D]."""
        n, width = qkv.shape
        hkv, d = self.layout.num_kv_heads, self.layout.head_dim
        nq = width - 2 * hkv * d
        if nq <= 0 or nq % d:
            raise ValueError(f"attention shard: packed q/k/v width {width} does not fit Hkv={hkv}, D={d}")
        q = qkv[:, :nq].reshape(n, nq // d, d).contiguous()  # the backends take dense q/k/v
        k = qkv[:, nq : nq + hkv * d].reshape(n, hkv, d).contiguous()
        v = qkv[:, nq + hkv * d :].reshape(n, hkv, d).contiguous()
        return self.attend(ctx, layer, q, k, v).reshape(n, nq)

    def release(self, seq_id: int) -> None:
        """Free the sequence's pages (unknown ids are an error: the model worker tracks them)."""
        blocks = self._blocks.pop(seq_id, None)
        if blocks is None:
            raise KeyError(f"attention shard: release of unknown sequence {seq_id}")
        del self._tokens[seq_id]
        self.pool.free(list(reversed(blocks)))
