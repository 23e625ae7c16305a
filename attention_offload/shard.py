"""AttentionShard: one attention worker's pages of the decode KV cache and its batched attention.

Partitioning is by request: a shard holds every layer's K/V of every request placed on it,
whole. Attention of a request then needs nothing from any other shard (no cross-shard
softmax reduction), a shard's capacity is a plain block count (admission is per shard), and
it works for any KV-head count: SmolLM2-135M has 3 KV heads, which 2 shards cannot split
evenly by head group.

The shard is storage addressed by the model worker's block ids: page ``b`` of this shard is
block ``b`` of the engine's sub-pool for this shard (engine/kv_cache/partitioned.py). The
engine owns everything about blocks: allocation, prefix caching (several requests reading
one cached page), speculative rollback (truncating a block table) and freeing. The shard
keeps no per-request state; each step tells it, per sequence of a micro-batch, the sequence's
block table, context length and new-token count (``ShardBatch``), once per step, not per
layer.

Lifecycle of a batch context (``ShardBatch.ctx``):

    begin(batch)                     metadata planned from the block tables (slots of the new tokens)
    attend(ctx, layer, ...) per layer  the new tokens' K/V written at their slots, then attention
    attend of the last layer         the context ends

Invariant that makes freeing a no-op here: the engine never lets a step read a slot that no
step wrote for the tokens now at that position. A block freed by the engine and handed out
again still holds its previous owner's K/V on the shard; the new owner's step writes every
slot of the tokens it computes before attention reads them (the backend stores k/v, then
attends over positions up to the new tokens), and positions before them are either written
by this request's earlier steps or are a prefix-cache hit, whose page holds exactly the
hashed content (the engine evicts a block's hash when it hands the block out). Rejected
draft slots past the kept tokens are rewritten by the next tokens before they are read. So
the shard needs no release, no truncate and no zeroing.

The shard never guesses: a block table shorter than the context, a block id outside its
pages, or an unknown context is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionMetadata
from engine.engine import make_attention_backend
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache


@dataclass(frozen=True)
class ShardBatch:
    """One micro-batch's sequences on one shard, in query-row order: sequence i has
    ``q_lens[i]`` new tokens at the end of ``seq_lens[i]`` tokens of context, held in pages
    ``block_tables[i]`` (this shard's page ids, exactly ceil(seq_lens[i] / block_size) of them:
    page j holds tokens [j * block_size, (j + 1) * block_size)). A micro-batch with none of
    its requests here is an empty batch (every shard hears of every micro-batch, so a shard's
    serve loop knows the order of the step's ATTENDs without a header each)."""

    ctx: int  # the batch context id, unique among the shard's live contexts
    seq_lens: list[int]
    q_lens: list[int]
    block_tables: list[list[int]]
    micro_batch: tuple[int, int] = (0, 1)  # (index, count) in the step (AttentionMetadata.micro_batch)
    width: int = 0  # q|k|v row width, (H + 2 Hkv) D, of the packed ATTEND tensors

    def __post_init__(self) -> None:
        n = len(self.seq_lens)
        if len(self.q_lens) != n or len(self.block_tables) != n:
            raise ValueError(f"ShardBatch {self.ctx}: seq_lens, q_lens, block_tables must be equal-length lists")
        i, count = self.micro_batch
        if not 0 <= i < count:
            raise ValueError(f"ShardBatch {self.ctx}: micro_batch {self.micro_batch} is not (index < count)")
        if any(q < 1 or q > s for q, s in zip(self.q_lens, self.seq_lens, strict=True)):
            raise ValueError(f"ShardBatch {self.ctx}: need 1 <= q_len <= seq_len, got {self.q_lens} / {self.seq_lens}")

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def num_table_entries(self) -> int:
        return sum(len(t) for t in self.block_tables)


@dataclass(frozen=True)
class ShardStats:
    total_blocks: int  # pages of every layer this shard holds (its sub-pool's size at the engine)
    live_contexts: int  # batch contexts begun and not ended (0 between steps)
    batches: int  # non-empty batch contexts begun since the shard was built


class AttentionShard:
    """Owns ``num_blocks`` pages of every layer (``PagedKVCache``) and an engine attention
    backend (``kind``: "sdpa", "triton", "auto"). No block pool: the model worker's engine
    allocates (module docstring)."""

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
        self.backend = make_attention_backend(backend, self.cache, sliding_window)
        self._ctx: dict[int, AttentionMetadata] = {}
        self._batches = 0

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    def stats(self) -> ShardStats:
        return ShardStats(self.num_blocks, len(self._ctx), self._batches)

    def begin(self, batch: ShardBatch) -> None:
        """Plan the context's metadata from its block tables (an empty batch opens no context)."""
        if not batch.seq_lens:
            return
        if batch.ctx in self._ctx:
            raise ValueError(f"attention shard: batch context {batch.ctx} is already live")
        bs = self.layout.block_size
        slots: list[int] = []
        for i, (seq_len, q_len, table) in enumerate(zip(batch.seq_lens, batch.q_lens, batch.block_tables, strict=True)):
            if len(table) != -(-seq_len // bs):
                raise ValueError(
                    f"attention shard: batch {batch.ctx} sequence {i}: block table of {len(table)} pages "
                    f"for {seq_len} tokens (need {-(-seq_len // bs)} of {bs} tokens)"
                )
            bad = [b for b in table if not 0 <= b < self.num_blocks]
            if bad:
                raise ValueError(
                    f"attention shard: batch {batch.ctx} sequence {i}: block {bad[0]} is outside the shard's "
                    f"{self.num_blocks} pages"
                )
            slots.extend(table[p // bs] * bs + p % bs for p in range(seq_len - q_len, seq_len))
        width = max(len(t) for t in batch.block_tables)
        dev = self.cache.kv.device
        qsl = [0]
        for q in batch.q_lens:
            qsl.append(qsl[-1] + q)
        self._ctx[batch.ctx] = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=qsl,
            seq_lens=list(batch.seq_lens),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in batch.block_tables], dtype=torch.long),
        )
        self._batches += 1

    def rows(self, ctx: int) -> int:
        """Query rows of a live context (its ATTEND tensors' first dim)."""
        meta = self._ctx.get(ctx)
        if meta is None:
            raise ValueError(f"attention shard: unknown batch context {ctx}")
        return meta.query_start_loc[-1]

    def attend(self, ctx: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [n, H, D], k/v: [n, Hkv, D] (the context's new tokens, in row order) -> [n, H, D].
        Writes k/v into the pages (before reading them); the last layer ends the context."""
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
