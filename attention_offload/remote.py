"""RemoteAttentionBackend: the engine's attention seam, served by attention shards (Lamina).

The model worker keeps embeddings, projections, MLP/MoE and sampling; per layer this backend
sends each request's q and new k/v to the shard that holds the request and receives the
attention output. The model sees an ordinary ``SplitAttentionBackend``: ``submit`` issues,
the Pending's ``wait`` scatters the shards' outputs back into the step's row order, and
``rotation`` asks the layer loop for micro-batches (2 by default) so that one micro-batch's
dense part runs while another's attention is away.

Placement and pages are the engine's: its block pool is partitioned like the shards
(``kv_partitions``, engine/kv_cache/partitioned.py), block ``starts[s] + b`` of the engine
is page ``b`` of shard s, and a request's blocks all lie in one partition, so its shard is
the partition of its blocks. The engine allocates, shares prefix-cached blocks, truncates
rejected drafts and frees; this backend only translates: per step and micro-batch it sends
each shard its sequences' block tables (shard page ids), context lengths and new-token
counts (a BEGIN), then per layer the packed q|k|v rows. A full shard is the scheduler's
ordinary "no free block" (preempt or wait), since the engine's sub-pool is the shard's
capacity. Nothing is sent when a request leaves: the shard keeps no per-request state (see
shard.py for why reusing a freed page needs nothing from it).

Per step, the first ``submit`` of a metadata object plans it (``meta.plans["remote"]``: rows
per shard, the BEGIN of each shard's batch context); every layer reuses the plan.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import torch

from attention_offload.shard import ShardBatch
from attention_offload.transport import AttentionTransport
from engine.attention.backend import AttentionMetadata
from engine.parallel import Pending

PLAN_KEY = "remote"


@dataclass(frozen=True)
class _Part:
    shard: int
    ctx: int
    rows: torch.Tensor | None  # [n] int64 query rows of this shard; None = every row, in order


class RemoteAttentionBackend:
    """``blocks_per_shard[s]``: shard s's page count (the engine's sub-pool s); ``block_size``:
    its page size (tokens)."""

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
        self.kv_partitions = list(blocks_per_shard)  # RemoteKVBackend: the engine's pool partitions
        # engine block id starts[s] + b is page b of shard s (PartitionedBlockPool's numbering)
        self.starts = list(itertools.accumulate(blocks_per_shard, initial=0))[:-1]
        self._ctx_ids = itertools.count()

    def shard_pages(self, request_id: str, table: list[int]) -> tuple[int, list[int]]:
        """A request's engine block table -> (its shard, the shard's page ids)."""
        if not table:
            raise ValueError(f"request {request_id!r} is in a step with an empty block table")
        s = bisect.bisect_right(self.starts, table[0]) - 1
        lo, hi = self.starts[s], self.starts[s] + self.kv_partitions[s]
        if not all(lo <= b < hi for b in table):
            raise RuntimeError(  # the engine's partitioned pool keeps a request in one partition
                f"request {request_id!r} holds blocks of several attention shards: {table} "
                f"(shard {s} is blocks [{lo}, {hi}))"
            )
        return s, [b - lo for b in table]

    # ------------------------------------------------------------ the step
    def _plan(self, meta: AttentionMetadata, width: int) -> list[_Part]:
        plan = meta.plans.get(PLAN_KEY)
        if plan is not None:
            return plan
        if len(meta.request_ids) != meta.num_seqs:
            raise ValueError("RemoteAttentionBackend needs AttentionMetadata.request_ids (one per sequence)")
        per_shard: dict[int, tuple[list[int], list[int], list[list[int]], list[int]]] = {}
        qsl, bs = meta.query_start_loc, self.block_size
        tables = meta.block_tables.tolist()  # [B, max_blocks], rows padded with 0
        for i, rid in enumerate(meta.request_ids):
            seq_len, q_len = meta.seq_lens[i], qsl[i + 1] - qsl[i]
            shard, pages = self.shard_pages(rid, tables[i][: -(-seq_len // bs)])
            lens, qlens, shard_tables, rows = per_shard.setdefault(shard, ([], [], [], []))
            lens.append(seq_len)
            qlens.append(q_len)
            shard_tables.append(pages)
            rows.extend(range(qsl[i], qsl[i + 1]))
        plan = []
        for shard in range(self.transport.num_shards):  # every shard hears of every micro-batch
            lens, qlens, shard_tables, rows = per_shard.get(shard, ([], [], [], []))
            ctx = next(self._ctx_ids)
            self.transport.begin(shard, ShardBatch(ctx, lens, qlens, shard_tables, meta.micro_batch, width))
            if lens:
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
