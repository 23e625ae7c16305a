"""How the model worker reaches its attention shards: the AttentionTransport ABC, the byte
counters and the in-process loopback (tests, benchmarks on one machine).

The wire, per shard (the torch.distributed transport sends exactly this; the loopback counts
the same bytes without sending):

    BEGIN    header + int64 [2 n + b] (seq lens | q lens | the n     once per micro-batch and step
             block tables, concatenated: b entries, ceil(seq len /
             block size) each) (every shard, n = 0 where it holds none
             of the micro-batch: no body)
    ATTEND   qkv [n, (H + 2 Hkv) D] out, o [n, H D] back          once per layer and micro-batch
             with rows on the shard; no header (the shard knows the step's order)
    STATS    header, int64 [3] back                                  the shard's pages and contexts
    PING     header                                                  keepalive between steps

There is no release message: the shard's pages are the engine's blocks (shard.py), which the
engine frees and reuses by itself.

``payload`` bytes are the attention tensors only, so per layer and token they equal the
analytic volume (q, k and v out, the attention output back); headers and BEGIN bodies are
``control`` bytes, per step rather than per token (per step and sequence for the block
tables, counted again on their own in ``tables``).

Ordering: a transport delivers one shard's messages in the order they were issued, and
``attend`` Pendings of one shard complete in that order.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from attention_offload.shard import AttentionShard, ShardBatch, ShardStats
from engine.parallel import CommWorker, Pending, Ready

HEADER_INTS = 7  # [kind, ctx, micro-batch index, n, width, micro-batch count, b (block-table entries)]
INT64_BYTES = 8


@dataclass
class TransferCounters:
    """Cumulative bytes between the model worker and its shards (both directions summed)."""

    payload_out: int = 0  # q, k, v sent
    payload_in: int = 0  # attention outputs received
    control: int = 0  # headers, BEGIN bodies (block tables included), STATS replies
    tables: int = 0  # of control: the BEGIN bodies' block-table entries (per step and sequence)
    attends: int = 0  # ATTEND messages (layers x micro-batches x shards touched)
    wait_seconds: float = 0.0  # the caller blocked in attend Pendings' wait (not overlapped)


def begin_body(batch: ShardBatch) -> torch.Tensor:
    """The BEGIN body: int64 [2 n + b] = seq lens | q lens | block tables, concatenated."""
    return torch.tensor([*batch.seq_lens, *batch.q_lens, *(b for t in batch.block_tables for b in t)], dtype=torch.long)


def parse_begin_body(body: list[int], n: int, block_size: int) -> tuple[list[int], list[int], list[list[int]]]:
    """``begin_body``'s inverse: (seq lens, q lens, block tables of ceil(seq len / block size))."""
    seq_lens, q_lens, flat = body[:n], body[n : 2 * n], body[2 * n :]
    tables, at = [], 0
    for s in seq_lens:
        k = -(-s // block_size)
        tables.append(flat[at : at + k])
        at += k
    if at != len(flat):
        raise ValueError(f"BEGIN body: {len(flat)} block-table entries for seq lens {seq_lens} (need {at})")
    return seq_lens, q_lens, tables


class AttentionTransport(ABC):
    """The model worker's side of its links to ``num_shards`` attention shards."""

    def __init__(self) -> None:
        self.counters = TransferCounters()

    @property
    @abstractmethod
    def num_shards(self) -> int: ...

    @abstractmethod
    def begin(self, shard: int, batch: ShardBatch) -> None:
        """Open a batch context on ``shard`` (asynchronous; errors surface at a later wait)."""

    @abstractmethod
    def attend(self, shard: int, ctx: int, layer: int, qkv: torch.Tensor) -> Pending[torch.Tensor]:
        """qkv: [n, (H + 2 Hkv) D] -> Pending of the attention output [n, H D]."""

    @abstractmethod
    def stats(self, shard: int) -> ShardStats:
        """The shard's pool, after every message issued before this call (blocking)."""

    @abstractmethod
    def close(self) -> None:
        """Ends the links (the shards' serve loops return)."""

    def ping(self) -> None:  # noqa: B027 - a no-op by default, on purpose
        """A no-op message to every shard, between steps: keeps a shard whose loop waits for
        the next message within a timeout (the torch.distributed one) alive while the model
        worker is idle. In-process shards wait without a timeout: nothing to do."""

    def _count_control(self, ints: int) -> None:
        self.counters.control += ints * INT64_BYTES

    def _count_begin_body(self, batch: ShardBatch) -> None:
        """A BEGIN's body (``begin_body``; none for an empty batch), its block tables apart too."""
        self._count_control(2 * batch.num_seqs + batch.num_table_entries)
        self.counters.tables += batch.num_table_entries * INT64_BYTES


class LoopbackTransport(AttentionTransport):
    """Shards in this process. ``threaded`` (default): each shard runs its messages on its own
    thread (a CommWorker), in order, so an ATTEND runs while the caller computes, as a remote
    shard would; False: every message runs at once on the caller's thread."""

    def __init__(self, shards: list[AttentionShard], threaded: bool = True):
        super().__init__()
        if not shards:
            raise ValueError("LoopbackTransport needs at least one shard")
        self.shards = shards
        self._workers = [CommWorker(f"attn-shard{i}") for i in range(len(shards))] if threaded else None
        self._unwaited: list[Pending[object]] = []  # BEGIN jobs not yet checked

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def _run(self, shard: int, job):  # -> Pending
        if self._workers is None:
            return Ready(job())
        return self._workers[shard].submit(job)

    def _drain(self) -> None:
        done, self._unwaited = self._unwaited, []
        for p in done:
            p.wait()  # re-raises a failed BEGIN

    def begin(self, shard: int, batch: ShardBatch) -> None:
        self._count_control(HEADER_INTS)
        self._count_begin_body(batch)
        self._unwaited.append(self._run(shard, lambda: self.shards[shard].begin(batch)))

    def attend(self, shard: int, ctx: int, layer: int, qkv: torch.Tensor) -> Pending[torch.Tensor]:
        c = self.counters
        c.payload_out += qkv.numel() * qkv.element_size()
        c.attends += 1
        pending = self._run(shard, lambda: self.shards[shard].attend_packed(ctx, layer, qkv))
        return _Counted(self, pending)

    def stats(self, shard: int) -> ShardStats:
        self._count_control(HEADER_INTS + 3)
        out = self._run(shard, self.shards[shard].stats).wait()
        self._drain()
        return out

    def close(self) -> None:
        if self._workers is not None:
            for w in self._workers:
                w.close()
        self._drain()


class _Counted:
    """Counts the attention output's bytes when it arrives; checks earlier control jobs."""

    def __init__(self, transport: LoopbackTransport, pending: Pending[torch.Tensor]):
        self._t, self._p, self._out = transport, pending, None

    def wait(self) -> torch.Tensor:
        if self._out is None:
            t0 = time.perf_counter()
            self._out = self._p.wait()
            self._t.counters.wait_seconds += time.perf_counter() - t0
            self._t.counters.payload_in += self._out.numel() * self._out.element_size()
            self._t._drain()
        return self._out
