"""RemoteAttentionBackend: the engine's attention seam, served by attention shards (Lamina).

The model worker keeps embeddings, projections, MLP/MoE and sampling; per layer this backend
sends each request's q and new k/v to the shard that holds the request and receives the
attention output. The model sees an ordinary ``SplitAttentionBackend``: ``submit`` issues,
the Pending's ``wait`` scatters the shards' outputs back into the step's row order, and
``rotation`` asks the layer loop for micro-batches (2 by default) so that one micro-batch's
dense part runs while another's attention is away.

Placement is the engine's: its block pool is partitioned like the shards (``kv_partitions``,
engine/kv_cache/partitioned.py), it places a request in the partition with the most free
blocks at its first allocation and calls ``place`` before the step that first runs it; its
scheduler then preempts or keeps a request waiting when that request's shard is full, exactly
as when a local pool is full. This backend mirrors each shard's block count from the lengths
it sends (the shard checks the same arithmetic); a step that outgrows the mirror means the
engine's accounting and the shards disagree: AttentionShardFull, a bug, not load. A request
placed again without a release, or whose step starts at token 0 while its shard holds
tokens of it, is an error. ``release`` frees its pages on the shard: the engine calls it
(``RemoteKVBackend``) whenever it frees the request's blocks (finished, cancelled,
preempted: inside ``schedule``, before the step runs).

Per step, the first ``submit`` of a metadata object plans it (``meta.plans["remote"]``: rows
per shard, the BEGIN of each shard's batch context); every layer reuses the plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from attention_offload.shard import AttentionShardFull, ShardBatch
from attention_offload.transport import AttentionTransport
from engine.attention.backend import AttentionMetadata
from engine.parallel import Pending

PLAN_KEY = "remote"


@dataclass(frozen=True)
class _Part:
    shard: int
    ctx: int
    rows: torch.Tensor | None  # [n] int64 query rows of this shard; None = every row, in order


@dataclass(frozen=True)
class _Placement:
    shard: int
    seq_id: int


class RemoteAttentionBackend:
    """``blocks_per_shard[s]``: shard s's pool size; ``block_size``: its page size (tokens)."""

    name = PLAN_KEY
    keeps_kv_remotely = True  # engine.attention.backend.RemoteKVBackend: no local pages

    def __init__(self, transport: AttentionTransport, blocks_per_shard: list[int], block_size: int, rotation: int = 2):
        if len(blocks_per_shard) != transport.num_shards:
            raise ValueError(f"blocks_per_shard has {len(blocks_per_shard)} entries for {transport.num_shards} shards")
        if rotation < 1:
            raise ValueError(f"rotation (micro-batches) must be >= 1, got {rotation}")
        self.transport = transport
        self.rotation = rotation
        self.block_size = block_size
        self.capacity = list(blocks_per_shard)
        self.kv_partitions = list(blocks_per_shard)  # RemoteKVBackend: the engine's pool partitions
        self.used = [0] * len(blocks_per_shard)  # blocks each shard holds (mirror)
        self._placed: dict[str, _Placement] = {}
        self._tokens: dict[str, int] = {}  # request -> tokens its shard holds
        self._seq_ids = itertools.count()
        self._ctx_ids = itertools.count()

    # ------------------------------------------------------------ lifecycle
    def shard_of(self, request_id: str) -> int | None:
        p = self._placed.get(request_id)
        return None if p is None else p.shard

    def place(self, request_id: str, partition: int) -> None:
        """The engine put the request on shard ``partition`` (its first allocation, or its first
        after a release); its pages there are taken by the steps that follow."""
        if request_id in self._placed:
            raise RuntimeError(
                f"request {request_id!r} placed on shard {partition} but it is still on shard "
                f"{self._placed[request_id].shard} (never released)"
            )
        if not 0 <= partition < len(self.capacity):
            raise ValueError(f"request {request_id!r}: shard {partition} out of range ({len(self.capacity)} shards)")
        self._placed[request_id] = _Placement(partition, next(self._seq_ids))
        self._tokens[request_id] = 0

    def release(self, request_id: str) -> None:
        """The request left (finished, cancelled, preempted): free its pages. No-op if unknown;
        placed but never in a step: forgotten here, the shard never heard of it."""
        p = self._placed.pop(request_id, None)
        if p is None:
            return
        tokens = self._tokens.pop(request_id)
        if tokens == 0:
            return
        self.used[p.shard] -= self._blocks(tokens)
        self.transport.release(p.shard, p.seq_id)

    def free_blocks(self) -> list[int]:
        return [c - u for c, u in zip(self.capacity, self.used, strict=True)]

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------ the step
    def _plan(self, meta: AttentionMetadata, width: int) -> list[_Part]:
        plan = meta.plans.get(PLAN_KEY)
        if plan is not None:
            return plan
        if len(meta.request_ids) != meta.num_seqs:
            raise ValueError("RemoteAttentionBackend needs AttentionMetadata.request_ids (one per sequence)")
        per_shard: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
        qsl = meta.query_start_loc
        for i, rid in enumerate(meta.request_ids):
            seq_len, q_len = meta.seq_lens[i], qsl[i + 1] - qsl[i]
            place = self._placed.get(rid)
            if place is None:
                raise RuntimeError(f"request {rid!r} is in a step but the engine never placed it on a shard")
            if seq_len - q_len == 0 and self._tokens[rid]:  # the engine frees before it recomputes
                raise RuntimeError(f"request {rid!r} starts again at token 0 but its shard pages were never released")
            grow = self._blocks(seq_len) - self._blocks(self._tokens[rid])
            if grow > self.free_blocks()[place.shard]:
                raise AttentionShardFull(  # the engine's per-shard pool should have prevented it
                    f"request {rid!r} needs {grow} more blocks on attention shard {place.shard}, "
                    f"{self.free_blocks()[place.shard]} free (engine and shard accounting disagree)"
                )
            self.used[place.shard] += grow
            self._tokens[rid] = seq_len
            seqs, lens, qlens, rows = per_shard.setdefault(place.shard, ([], [], [], []))
            seqs.append(place.seq_id)
            lens.append(seq_len)
            qlens.append(q_len)
            rows.extend(range(qsl[i], qsl[i + 1]))
        plan = []
        for shard in range(self.transport.num_shards):  # every shard hears of every micro-batch
            seqs, lens, qlens, rows = per_shard.get(shard, ([], [], [], []))
            ctx = next(self._ctx_ids)
            self.transport.begin(shard, ShardBatch(ctx, seqs, lens, qlens, meta.micro_batch, width))
            if seqs:
                whole = len(per_shard) == 1
                plan.append(_Part(shard, ctx, None if whole else torch.tensor(rows, dtype=torch.long)))
        meta.plans[PLAN_KEY] = plan
        return plan

    def submit(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> Pending[torch.Tensor]:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> Pending of [T, H, D]
        t = q.shape[0]
        parts = self._plan(meta, (q.shape[1] + 2 * k.shape[1]) * q.shape[2])
        flat = (q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1))
        pending = []
        for p in parts:
            cols = flat if p.rows is None else tuple(x[p.rows.to(x.device)] for x in flat)
            qkv = torch.cat(cols, dim=1)  # [n, (H + 2 Hkv) D]: q | k | v per row
            pending.append((p, self.transport.attend(p.shard, p.ctx, layer, qkv)))
        return _Gathered(pending, q.shape)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.submit(layer, q, k, v, meta).wait()


class _Gathered:
    """The shards' outputs of one layer, scattered back into row order: wait() -> [T, H, D]."""

    def __init__(self, parts: list[tuple[_Part, Pending[torch.Tensor]]], shape: torch.Size):
        self._parts, self._shape, self._out = parts, shape, None

    def wait(self) -> torch.Tensor:
        if self._out is None:
            if len(self._parts) == 1 and self._parts[0][0].rows is None:
                self._out = self._parts[0][1].wait().view(self._shape)
            else:
                out = None
                for p, pend in self._parts:
                    o = pend.wait()  # [n, H D]
                    if out is None:
                        out = o.new_empty((self._shape[0], o.shape[1]))
                    out[p.rows.to(o.device)] = o
                self._out = out.view(self._shape)
        return self._out
