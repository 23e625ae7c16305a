"""The torch.distributed transport: the model worker and its shards in one group, over the
engine's Communicator (gloo on CPU; NCCL on GPU: same code, tensors on the CUDA device,
written but untested here: no GPU machine).

Ranks: the model worker is ``model_rank`` (0 by default), shard s is ``shard_ranks[s]``.
Messages go model -> shard on tag 0 and replies shard -> model on tag 1; a header is
int64 [7] = [kind, ctx, micro-batch index, n, width, micro-batch count, b] (b: the BEGIN
body's block-table entries). Each side issues its ops in message order, so sends and
receives pair up by order per peer and tag.

Within a step ATTENDs carry no header (two ops per layer and micro-batch: q|k|v out, the
output back): every shard gets a BEGIN for every micro-batch (empty where none of its
requests is in it), the first announcing the step's micro-batch count, and the layer loop
submits in a fixed order (layer l of micro-batches 0..count-1, then layer l + 1; BEGIN i
right before micro-batch i's layer 0), which the shard's loop follows. Between steps the
shard reads headers: BEGIN (a step starts), STATS, PING, CLOSE, and the KV-transfer control
messages of shard_kv.py (EXPECT, POLL, CANCEL, ADDRESS: a prefill worker's KV goes straight
into the shard's receiver; the model worker keeps the bookkeeping). No RELEASE: the shard's
pages are the engine's blocks (shard.py).

KV-transfer control (header field n = the body's int64 count, count = requests):

    EXPECT   body [k, page ids (k), request id (encoded)]            fire-and-forget
    CANCEL   body [request id (encoded)]                             fire-and-forget
    POLL     body [request ids (encoded)]; reply int64 [count + 1] = state codes
             (shard_kv.TRANSFER_STATES) | e, then, when e > 0, int64 [e] = the failed ones'
             errors (encoded), in order
    ADDRESS  no body; reply int64 [1] = e, then int64 [e] = the receiver's address as JSON
             UTF-8 (e = 0: no receiver); sent once, at join, before the model worker steps

Strings travel as int64 [len, bytes...] each (``encode_strings``): a few dozen bytes per
request, once per request or poll, where the step's tensors are megabytes.

The model side never blocks on a send: sends are asynchronous and waited with the attention
output's receive (or at the next ``stats``/``close``), so a micro-batch's q/k/v leave while the next
micro-batch's dense part runs. ``serve_shard`` is the shard's loop: it blocks on the next
header and returns at CLOSE. Its receive is bounded by the communicator's timeout (a gloo
op that timed out leaves the group unusable, so the shard cannot just wait again): an idle
model worker keeps its shards alive with PING headers (``ping``, no reply, called between
steps at least once per timeout: OffloadedEngine.keepalive), while inside a step every
receive still fails fast within the timeout.
A shard error (a block table it cannot hold, a context mismatch) ends its loop with the exception; the model
worker's waits then fail with CommunicationError within the timeout, never a wrong token.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from attention_offload.shard import AttentionShard, ShardBatch, ShardStats
from attention_offload.shard_kv import FAILED_CODE, ShardKV
from attention_offload.transport import HEADER_INTS, AttentionTransport, begin_body, parse_begin_body
from engine.kv_cache.layout import KVLayout
from engine.parallel import Communicator, Pending

BEGIN, STATS, CLOSE, PING = 1, 4, 5, 6  # 3 was RELEASE (the shard keeps no per-request state)
EXPECT, POLL, CANCEL, ADDRESS = 7, 8, 9, 10  # KV-transfer control (shard_kv.py)
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
        self,
        shard: int,
        kind: int,
        ctx: int = 0,
        index: int = 0,
        n: int = 0,
        width: int = 0,
        count: int = 0,
        entries: int = 0,
    ) -> None:
        self._send(shard, header_tensor(kind, ctx, index, n, width, count, entries))
        self._count_control(HEADER_INTS)

    def _send(self, shard: int, x: torch.Tensor) -> None:
        self._unwaited.append(self.comm.send_async(x.to(self.comm.device), self.ranks[shard], REQUEST_TAG))

    def _drain(self) -> None:
        done, self._unwaited = self._unwaited, []
        for p in done:
            p.wait()

    def begin(self, shard: int, batch: ShardBatch) -> None:
        index, count = batch.micro_batch
        self._header(shard, BEGIN, batch.ctx, index, batch.num_seqs, batch.width, count, batch.num_table_entries)
        if batch.seq_lens:
            self._send(shard, begin_body(batch))
        self._count_begin_body(batch)

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

    def stats(self, shard: int) -> ShardStats:
        self._header(shard, STATS)
        reply = self.comm.recv(torch.empty(3, dtype=torch.long, device=self.comm.device), self.ranks[shard], REPLY_TAG)
        self._count_control(3)
        self._drain()
        return ShardStats(*reply.tolist())

    def ping(self) -> None:
        self._drain()  # the previous pings: the unwaited list stays bounded while idle
        for s in range(self.num_shards):
            self._header(s, PING)

    def close(self) -> None:
        for s in range(self.num_shards):
            self._header(s, CLOSE)
        self._drain()

    # ------------------------------------------------------------ KV-transfer control (between steps)
    def _body(self, shard: int, kind: int, body: list[int], count: int = 0) -> None:
        self._header(shard, kind, n=len(body), count=count)
        self._send(shard, torch.tensor(body, dtype=torch.long))
        self._count_control(len(body))

    def kv_expect(self, shard: int, request_id: str, pages: list[int]) -> None:
        """The shard's receiver expects the request's KV in ``pages`` (its page ids)."""
        self._body(shard, EXPECT, [len(pages), *pages, *encode_strings([request_id])])

    def kv_cancel(self, shard: int, request_id: str) -> None:
        self._body(shard, CANCEL, encode_strings([request_id]))

    def kv_poll(self, shard: int, request_ids: list[str]) -> list[tuple[int, str | None]]:
        """Per request: (its state's code in shard_kv.TRANSFER_STATES, why it failed or None).
        Blocking: one round trip."""
        self._body(shard, POLL, encode_strings(request_ids), count=len(request_ids))
        dev, rank = self.comm.device, self.ranks[shard]
        head = self.comm.recv(torch.empty(len(request_ids) + 1, dtype=torch.long, device=dev), rank, REPLY_TAG)
        *codes, e = head.tolist()
        errors: list[str] = []
        if e:
            errors = decode_strings(self.comm.recv(torch.empty(e, dtype=torch.long, device=dev), rank, REPLY_TAG))
        self._count_control(len(request_ids) + 1 + e)
        self._drain()
        out, it = [], iter(errors)
        for code in codes:
            out.append((code, next(it) if code == FAILED_CODE else None))
        return out


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


def header_tensor(
    kind: int, ctx: int = 0, index: int = 0, n: int = 0, width: int = 0, count: int = 0, entries: int = 0
) -> torch.Tensor:
    """A message header: int64 [HEADER_INTS] (module docstring)."""
    return torch.tensor([kind, ctx, index, n, width, count, entries], dtype=torch.long)


def encode_strings(items: list[str]) -> list[int]:
    """Strings -> int64 values [len, UTF-8 bytes...] per string (``decode_strings``'s input)."""
    out: list[int] = []
    for item in items:
        raw = item.encode()
        out.append(len(raw))
        out.extend(raw)
    return out


def decode_strings(values: torch.Tensor | list[int]) -> list[str]:
    flat = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    out, at = [], 0
    while at < len(flat):
        n = flat[at]
        if n < 0 or at + 1 + n > len(flat):
            raise ValueError(f"attention group: malformed string field (length {n} at {at} of {len(flat)})")
        out.append(bytes(flat[at + 1 : at + 1 + n]).decode())
        at += 1 + n
    return out


def _hashable(value: Any) -> Any:
    """JSON's lists back to tuples (a torch transport's address is (host, port), used as a key)."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def query_kv_addresses(comm: Communicator, shard_ranks: list[int]) -> list[Any]:
    """The model worker's side of ADDRESS, at join, before anything else uses ``comm``: each
    shard's KV receiver address, in shard order (None: that worker has no receiver)."""
    out = []
    for rank in shard_ranks:
        comm.send(header_tensor(ADDRESS).to(comm.device), rank, REQUEST_TAG)
        (e,) = comm.recv(torch.empty(1, dtype=torch.long, device=comm.device), rank, REPLY_TAG).tolist()
        raw = comm.recv(torch.empty(e, dtype=torch.long, device=comm.device), rank, REPLY_TAG).tolist() if e else []
        out.append(_hashable(json.loads(bytes(raw).decode())) if raw else None)
    return out


def serve_shard(comm: Communicator, shard: AttentionShard, model_rank: int = 0, kv: ShardKV | None = None) -> int:
    """The attention worker's loop: serve the model worker's messages in order until CLOSE.
    ``kv``: the shard's KV receiver (None: none; EXPECTs fail, named). Returns the number of
    messages served; raises what the shard raised."""
    with torch.inference_mode():
        return _serve(comm, shard, model_rank, kv if kv is not None else ShardKV(None))


def _serve_kv(comm: Communicator, kv: ShardKV, model_rank: int, header: list[int]) -> None:
    """One KV-transfer control message (module docstring)."""
    kind, n, count, dev = header[0], header[3], header[5], comm.device
    body = comm.recv(torch.empty(n, dtype=torch.long, device=dev), model_rank, REQUEST_TAG).tolist() if n else []
    if kind == EXPECT:
        k = body[0]
        (rid,) = decode_strings(body[1 + k :])
        kv.expect(rid, body[1 : 1 + k])
    elif kind == CANCEL:
        (rid,) = decode_strings(body)
        kv.cancel(rid)
    elif kind == POLL:
        rids = decode_strings(body)
        if len(rids) != count:
            raise ValueError(f"attention shard: POLL of {count} requests carries {len(rids)} ids")
        states = [kv.status(rid) for rid in rids]
        errors = encode_strings([why or "" for code, why in states if code == FAILED_CODE])
        comm.send(torch.tensor([*(c for c, _ in states), len(errors)], device=dev), model_rank, REPLY_TAG)
        if errors:
            comm.send(torch.tensor(errors, device=dev), model_rank, REPLY_TAG)
    elif kind == ADDRESS:
        address = kv.address
        raw = list(json.dumps(address).encode()) if address is not None else []
        comm.send(torch.tensor([len(raw)], device=dev), model_rank, REPLY_TAG)
        if raw:
            comm.send(torch.tensor(raw, dtype=torch.long, device=dev), model_rank, REPLY_TAG)


def _serve(comm: Communicator, shard: AttentionShard, model_rank: int, kv: ShardKV) -> int:
    dev, served = comm.device, 0
    while True:
        header = _recv_header(comm, model_rank)
        kind, index = header[0], header[2]
        served += 1
        if kind == BEGIN:
            if index != 0:
                raise ValueError(f"attention shard: a step starts with micro-batch {index}, not 0")
            served += _serve_step(comm, shard, model_rank, header)
        elif kind == STATS:
            s = shard.stats()
            comm.send(torch.tensor([s.total_blocks, s.live_contexts, s.batches], device=dev), model_rank, REPLY_TAG)
        elif kind == PING:
            pass  # keepalive: the model worker is idle
        elif kind in (EXPECT, POLL, CANCEL, ADDRESS):
            _serve_kv(comm, kv, model_rank, header)
        elif kind == CLOSE:
            return served
        else:
            raise ValueError(f"attention shard: unexpected message kind {kind} between steps")


def _recv_header(comm: Communicator, model_rank: int) -> list[int]:
    header = torch.empty(HEADER_INTS, dtype=torch.long, device=comm.device)
    return comm.recv(header, model_rank, REQUEST_TAG).tolist()


def _begin(comm: Communicator, shard: AttentionShard, model_rank: int, header: list[int]) -> None:
    """A BEGIN's body (none when n = 0) -> the shard's batch context."""
    _, ctx, index, n, width, count, entries = header
    body: list[int] = []
    if n:
        size = 2 * n + entries
        body = comm.recv(torch.empty(size, dtype=torch.long, device=comm.device), model_rank, REQUEST_TAG).tolist()
    seq_lens, q_lens, tables = parse_begin_body(body, n, shard.layout.block_size)
    shard.begin(ShardBatch(ctx, seq_lens, q_lens, tables, (index, count), width))


def _serve_step(comm: Communicator, shard: AttentionShard, model_rank: int, first: list[int]) -> int:
    """One step of ``count`` micro-batches (``first``: micro-batch 0's BEGIN header), in the
    layer loop's order -> messages served."""
    _, ctx0, _, n0, width, count, _ = first
    _begin(comm, shard, model_rank, first)
    batches = [(ctx0, n0)]
    dtype, served = shard.layout.torch_dtype, 0
    for layer in range(shard.layout.num_layers):
        for i in range(count):
            if layer == 0 and i > 0:
                header = _recv_header(comm, model_rank)
                kind, ctx, index, n, w, c, _ = header
                served += 1
                if (kind, index, w, c) != (BEGIN, i, width, count):
                    raise ValueError(
                        f"attention shard: expected BEGIN of micro-batch {i}/{count} (width {width}), "
                        f"got kind {kind}, micro-batch {index}/{c}, width {w}"
                    )
                _begin(comm, shard, model_rank, header)
                batches.append((ctx, n))
            ctx, n = batches[i]
            if n:  # n sequences here; their rows: the context's query rows
                qkv = torch.empty((shard.rows(ctx), width), dtype=dtype, device=comm.device)
                qkv = comm.recv(qkv, model_rank, REQUEST_TAG)
                comm.send(shard.attend_packed(ctx, layer, qkv), model_rank, REPLY_TAG)
                served += 1
    return served
