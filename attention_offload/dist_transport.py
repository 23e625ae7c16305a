"""The torch.distributed transport: the model worker and its shards in one group, over the
engine's Communicator (gloo on CPU; NCCL on GPU: same code, tensors on the CUDA device,
written but untested here: no GPU machine).

Ranks: the model worker is ``model_rank`` (0 by default), shard s is ``shard_ranks[s]``.
Messages go model -> shard on tag 0 and replies shard -> model on tag 1; a header is
int64 [6] = [kind, ctx, micro-batch index, n, width, micro-batch count]. Each side issues
its ops in message order, so sends and receives pair up by order per peer and tag.

Within a step ATTENDs carry no header (two ops per layer and micro-batch: q|k|v out, the
output back): every shard gets a BEGIN for every micro-batch (empty where none of its
requests is in it), the first announcing the step's micro-batch count, and the layer loop
submits in a fixed order (layer l of micro-batches 0..count-1, then layer l + 1; BEGIN i
right before micro-batch i's layer 0), which the shard's loop follows. Between steps the
shard reads headers: BEGIN (a step starts), RELEASE, STATS, CLOSE.

The model side never blocks on a send: sends are asynchronous and waited with the attention
output's receive (or at the next ``stats``/``close``), so a micro-batch's q/k/v leave while the next
micro-batch's dense part runs. ``serve_shard`` is the shard's loop: it blocks on the next
header and returns at CLOSE. Its receive is bounded by the communicator's timeout (a gloo
op that timed out leaves the group unusable, so the shard cannot just wait again): an idle
model worker keeps its shards alive with PING headers (``ping``, no reply, called between
steps at least once per timeout: OffloadedEngine.keepalive), while inside a step every
receive still fails fast within the timeout.
A shard error (a full pool, a context mismatch) ends its loop with the exception; the model
worker's waits then fail with CommunicationError within the timeout, never a wrong token.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from attention_offload.shard import AttentionShard, ShardBatch, ShardStats
from attention_offload.transport import HEADER_INTS, AttentionTransport, begin_body
from engine.kv_cache.layout import KVLayout
from engine.parallel import Communicator, Pending

BEGIN, RELEASE, STATS, CLOSE, PING = 1, 3, 4, 5, 6
REQUEST_TAG, REPLY_TAG = 0, 1


class DistAttentionTransport(AttentionTransport):
    """The model worker's side. ``layout``: the shards' KV geometry (Hkv, D: the reply's width
    is the packed width minus 2 Hkv D)."""

    def __init__(self, comm: Communicator | None, shard_ranks: list[int], layout: KVLayout):
        """``comm`` None: connected later (``connect``), once the serving side formed the group;
        the engine can be built (and its pool sized) before that, but sends nothing until."""
        super().__init__()
        if not shard_ranks or len(set(shard_ranks)) != len(shard_ranks):
            raise ValueError(f"shard_ranks {shard_ranks} must be distinct ranks")
        self.ranks, self.layout = list(shard_ranks), layout
        self._comm: Communicator | None = None
        self._unwaited: list[Pending[Any]] = []  # sends not yet waited
        if comm is not None:
            self.connect(comm)

    def connect(self, comm: Communicator) -> None:
        if self._comm is not None:
            raise RuntimeError("DistAttentionTransport is already connected (a group is never reused)")
        if comm.rank in self.ranks:
            raise ValueError(f"shard_ranks {self.ranks} must not include this rank ({comm.rank})")
        self._comm = comm

    @property
    def connected(self) -> bool:
        return self._comm is not None

    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            raise RuntimeError("DistAttentionTransport: not connected yet (its attention group has not formed)")
        return self._comm

    @property
    def num_shards(self) -> int:
        return len(self.ranks)

    def _header(
        self, shard: int, kind: int, ctx: int = 0, index: int = 0, n: int = 0, width: int = 0, count: int = 0
    ) -> None:
        self._send(shard, torch.tensor([kind, ctx, index, n, width, count], dtype=torch.long))
        self._count_control(HEADER_INTS)

    def _send(self, shard: int, x: torch.Tensor) -> None:
        self._unwaited.append(self.comm.send_async(x.to(self.comm.device), self.ranks[shard], REQUEST_TAG))

    def _drain(self) -> None:
        done, self._unwaited = self._unwaited, []
        for p in done:
            p.wait()

    def begin(self, shard: int, batch: ShardBatch) -> None:
        index, count = batch.micro_batch
        self._header(shard, BEGIN, batch.ctx, index, len(batch.seq_ids), batch.width, count)
        if batch.seq_ids:
            body = begin_body(batch)
            self._send(shard, body)
            self._count_control(body.numel())

    def attend(self, shard: int, ctx: int, layer: int, qkv: torch.Tensor) -> Pending[torch.Tensor]:
        n, width = qkv.shape  # no header: the shard expects this (ctx, layer) next
        self._send(shard, qkv)
        out = qkv.new_empty((n, width - 2 * self.layout.num_kv_heads * self.layout.head_dim))
        c = self.counters
        c.payload_out += qkv.numel() * qkv.element_size()
        c.attends += 1
        recv = self.comm.recv_async(out, self.ranks[shard], REPLY_TAG)
        sends, self._unwaited = self._unwaited, []
        return _Reply(self, sends, recv)

    def release(self, shard: int, seq_id: int) -> None:
        self._header(shard, RELEASE, n=seq_id)

    def stats(self, shard: int) -> ShardStats:
        self._header(shard, STATS)
        reply = self.comm.recv(torch.empty(3, dtype=torch.long, device=self.comm.device), self.ranks[shard], REPLY_TAG)
        self._count_control(3)
        self._drain()
        free, total, seqs = reply.tolist()
        return ShardStats(free, total, seqs)

    def ping(self) -> None:
        self._drain()  # the previous pings (and releases): the unwaited list stays bounded while idle
        for s in range(self.num_shards):
            self._header(s, PING)

    def close(self) -> None:
        for s in range(self.num_shards):
            self._header(s, CLOSE)
        self._drain()


class _Reply:
    def __init__(self, transport: DistAttentionTransport, sends: list[Pending[Any]], recv: Pending[torch.Tensor]):
        self._t, self._sends, self._recv, self._out = transport, sends, recv, None

    def wait(self) -> torch.Tensor:
        if self._out is None:
            t0 = time.perf_counter()
            for s in self._sends:
                s.wait()
            out = self._recv.wait()
            self._t.counters.wait_seconds += time.perf_counter() - t0
            self._t.counters.payload_in += out.numel() * out.element_size()
            self._out = out
        return self._out


def serve_shard(comm: Communicator, shard: AttentionShard, model_rank: int = 0) -> int:
    """The attention worker's loop: serve the model worker's messages in order until CLOSE.
    Returns the number of messages served; raises what the shard raised."""
    with torch.inference_mode():
        return _serve(comm, shard, model_rank)


def _serve(comm: Communicator, shard: AttentionShard, model_rank: int) -> int:
    dev, served = comm.device, 0
    while True:
        kind, ctx, index, n, width, count = _recv_header(comm, model_rank)
        served += 1
        if kind == BEGIN:
            if index != 0:
                raise ValueError(f"attention shard: a step starts with micro-batch {index}, not 0")
            served += _serve_step(comm, shard, model_rank, (ctx, n, width, count))
        elif kind == RELEASE:
            shard.release(n)
        elif kind == STATS:
            s = shard.stats()
            comm.send(torch.tensor([s.free_blocks, s.total_blocks, s.sequences], device=dev), model_rank, REPLY_TAG)
        elif kind == PING:
            pass  # keepalive: the model worker is idle
        elif kind == CLOSE:
            return served
        else:
            raise ValueError(f"attention shard: unexpected message kind {kind} between steps")


def _recv_header(comm: Communicator, model_rank: int) -> list[int]:
    header = torch.empty(HEADER_INTS, dtype=torch.long, device=comm.device)
    return comm.recv(header, model_rank, REQUEST_TAG).tolist()


def _begin(
    comm: Communicator, shard: AttentionShard, model_rank: int, ctx: int, n: int, index: int, width: int, count: int
) -> None:
    body: list[int] = []
    if n:
        body = comm.recv(torch.empty(3 * n, dtype=torch.long, device=comm.device), model_rank, REQUEST_TAG).tolist()
    shard.begin(ShardBatch(ctx, body[:n], body[n : 2 * n], body[2 * n :], (index, count), width))


def _serve_step(comm: Communicator, shard: AttentionShard, model_rank: int, first: tuple[int, int, int, int]) -> int:
    """One step of ``count`` micro-batches, in the layer loop's order -> messages served."""
    ctx0, n0, width, count = first
    _begin(comm, shard, model_rank, ctx0, n0, 0, width, count)
    batches = [(ctx0, n0)]
    dtype, served = shard.layout.torch_dtype, 0
    for layer in range(shard.layout.num_layers):
        for i in range(count):
            if layer == 0 and i > 0:
                kind, ctx, index, n, w, c = _recv_header(comm, model_rank)
                served += 1
                if (kind, index, w, c) != (BEGIN, i, width, count):
                    raise ValueError(
                        f"attention shard: expected BEGIN of micro-batch {i}/{count} (width {width}), "
                        f"got kind {kind}, micro-batch {index}/{c}, width {w}"
                    )
                _begin(comm, shard, model_rank, ctx, n, i, width, count)
                batches.append((ctx, n))
            ctx, n = batches[i]
            if n:  # n sequences here; their rows: the context's query rows
                qkv = torch.empty((shard.rows(ctx), width), dtype=dtype, device=comm.device)
                qkv = comm.recv(qkv, model_rank, REQUEST_TAG)
                comm.send(shard.attend_packed(ctx, layer, qkv), model_rank, REPLY_TAG)
                served += 1
    return served
