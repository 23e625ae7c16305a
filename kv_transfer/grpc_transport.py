"""gRPC transport, for links without a collective backend (``KVTransfer`` in
protos/kv_transfer.proto).

The receiver runs a grpc server; its ``address`` is ``"host:port"``. ``Handshake`` swaps
layouts (the sender refuses a mismatch). Each request is one client-streaming ``Push``
call opened at its first chunk: page chunks in order, each split into parts of at most
``max_part_bytes`` (default 2 MiB, under gRPC's 4 MiB default message limit), then a
``StreamEnd``. The server reassembles each chunk's parts (contiguous offsets, at most
``nbytes`` bytes) and hands it to the ReceiverBook; a stream that ends mid-chunk delivers
the partial bytes, which the book rejects as truncated. When the stream closes the server
replies with a ``PushAck`` carrying the book's verdict, and only then is the request DONE
(or FAILED, with the receiver's message) on the sender side.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import FaultHook, KVChunk, KVTransferError, PageSink, check_layouts, tensor_bytes
from kv_transfer.receiver_book import BookedReceiver
from kv_transfer.sender_book import BookedSender
from protos import kv_transfer_pb2 as pb
from protos import kv_transfer_pb2_grpc as pb_grpc

_MSG_LIMIT = 4 << 20  # gRPC's default; parts stay below it, with room for the envelope


def _layout_msg(layout: KVLayout) -> pb.LayoutMsg:
    fields = layout.to_dict()
    fields["total_kv_heads"] = layout.total_kv_heads or 0  # 0 on the wire: whole (what an older peer sends)
    return pb.LayoutMsg(**fields)


def _layout_from(msg: pb.LayoutMsg) -> KVLayout:
    return KVLayout(
        msg.dtype,
        msg.block_size,
        msg.num_layers,
        msg.num_kv_heads,
        msg.head_dim,
        msg.kv_head_start,
        msg.total_kv_heads or None,  # 0: a peer without the partition fields holds every head
    )


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, receiver: GrpcReceiver):
        self.rx = receiver

    def Handshake(self, request: pb.LayoutMsg, context: grpc.ServicerContext) -> pb.LayoutMsg:  # noqa: N802
        return _layout_msg(self.rx.layout)  # the sender compares and refuses a mismatch

    def Push(self, request_iterator: Iterator[pb.KVChunk], context: grpc.ServicerContext) -> pb.PushAck:  # noqa: N802
        book = self.rx.book
        rid: str | None = None
        part: tuple[pb.PageData, bytearray] | None = None  # chunk being reassembled
        ended = False
        try:
            for msg in request_iterator:
                if rid is None:
                    rid = msg.request_id
                elif msg.request_id != rid:
                    raise KVTransferError(f"stream for {rid!r} carried a message for {msg.request_id!r}")
                if msg.HasField("pages"):
                    p = msg.pages
                    if part is None:
                        part = (p, bytearray())
                    head, buf = part
                    if p.offset != len(buf) or len(buf) + len(p.data) > head.nbytes:
                        raise KVTransferError(
                            f"part at offset {p.offset} (+{len(p.data)}) does not continue a {head.nbytes}-byte chunk at {len(buf)}"
                        )
                    buf += p.data
                    if len(buf) == head.nbytes:
                        self._deliver(rid, head, buf)
                        part = None
                else:
                    if part is not None:
                        raise KVTransferError("stream end inside a chunk")
                    book.on_finish(rid, msg.end.num_chunks)
                    ended = True
            if rid is not None and not ended:
                raise KVTransferError("stream closed before its end marker")
        except Exception as e:  # noqa: BLE001 - protocol violation or the client went away
            if rid is None:
                return pb.PushAck(ok=False, message=f"empty or broken stream: {e}")
            if part is not None:
                self._deliver(rid, *part)  # the book reports it as truncated
            book.on_stream_error({rid}, str(e) or type(e).__name__)  # a gRPC error may have an empty str()
        if rid is None:
            return pb.PushAck(ok=False, message="empty stream")
        ok, message = book.status_for_ack(rid)
        return pb.PushAck(ok=ok, message=message)

    def _deliver(self, rid: str, head: pb.PageData, buf: bytearray) -> None:
        payload = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        self.rx.book.on_chunk(KVChunk(rid, head.layer, head.first_page, head.num_pages, payload, head.checksum))


class GrpcReceiver(BookedReceiver):
    def __init__(
        self,
        layout: KVLayout,
        cache: PagedKVCache | PageSink,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 16,
        max_unexpected_bytes: int = 64 << 20,
    ):
        super().__init__(layout, cache, max_unexpected_bytes)
        # each open Push stream holds one worker thread until its StreamEnd
        self._server = grpc.server(ThreadPoolExecutor(max_workers, thread_name_prefix="kv-grpc-recv"))
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(self), self._server)
        self._port = self._server.add_insecure_port(f"{host}:{port}")
        if self._port == 0:
            raise KVTransferError(f"could not bind a gRPC server on {host}:{port}")
        self._host = host
        self._server.start()
        self._closed = False

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._server.stop(grace=1.0).wait()


class GrpcSender(BookedSender):
    _acks_finish = True  # DONE comes from the receiver's PushAck

    def __init__(
        self,
        layout: KVLayout,
        *,
        fault_hook: FaultHook | None = None,
        max_part_bytes: int = 2 << 20,
        connect_timeout_s: float = 30.0,
    ):
        super().__init__(layout, fault_hook=fault_hook)
        if not 0 < max_part_bytes <= _MSG_LIMIT - (64 << 10):
            raise ValueError(f"max_part_bytes must be in (0, {_MSG_LIMIT - (64 << 10)}]")
        self.max_part_bytes = max_part_bytes
        self.connect_timeout_s = connect_timeout_s
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.KVTransferStub | None = None
        self._streams: dict[str, queue.SimpleQueue] = {}  # open Push calls (worker thread only)
        self._acks: set[grpc.Future] = set()
        self._acks_lock = threading.Lock()

    def connect(self, peer: str) -> None:
        channel = grpc.insecure_channel(peer)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout_s)
            stub = pb_grpc.KVTransferStub(channel)
            theirs = _layout_from(stub.Handshake(_layout_msg(self.layout), timeout=self.connect_timeout_s))
            check_layouts(self.layout, theirs, f"gRPC receiver at {peer}")
        except BaseException:
            channel.close()
            raise
        self._channel, self._stub = channel, stub
        self._start(f"kv-grpc-send->{peer}")

    def _stream(self, rid: str) -> queue.SimpleQueue:
        q = self._streams.get(rid)
        if q is None:
            q = self._streams[rid] = queue.SimpleQueue()
            fut = self._stub.Push.future(iter(q.get, None))  # None ends the stream
            with self._acks_lock:
                self._acks.add(fut)
            fut.add_done_callback(functools.partial(self._on_ack, rid))
        return q

    def _on_ack(self, rid: str, fut: grpc.Future) -> None:
        with self._acks_lock:
            self._acks.discard(fut)
        try:
            ack = fut.result()
        except grpc.RpcError as e:
            self.book.fail(rid, f"gRPC {e.code().name}: {e.details()}")
            return
        except grpc.FutureCancelledError:
            self.book.fail(rid, "Push call cancelled (sender closed)")
            return
        if ack.ok:
            self.book.done(rid)
        else:
            self.book.fail(rid, f"receiver: {ack.message}")

    def _transmit_chunk(self, chunk: KVChunk) -> None:
        q = self._stream(chunk.request_id)
        data = memoryview(tensor_bytes(chunk.payload).numpy())
        n, step = len(data), self.max_part_bytes
        for off in range(0, max(n, 1), step):
            page = pb.PageData(
                layer=chunk.layer, first_page=chunk.first_page, num_pages=chunk.num_pages,
                nbytes=n, offset=off, data=bytes(data[off : off + step]), checksum=chunk.checksum,
            )  # fmt: skip
            q.put(pb.KVChunk(request_id=chunk.request_id, pages=page))

    def _transmit_finish(self, request_id: str, num_chunks: int) -> None:
        q = self._stream(request_id)
        q.put(pb.KVChunk(request_id=request_id, end=pb.StreamEnd(num_chunks=num_chunks)))
        q.put(None)
        del self._streams[request_id]

    def _disconnect(self, ack_timeout_s: float = 10.0) -> None:
        if self._channel is None:
            return
        for q in self._streams.values():  # unfinished requests: the receiver fails them
            q.put(None)
        with self._acks_lock:
            pending = list(self._acks)
        for fut in pending:
            try:
                fut.result(timeout=ack_timeout_s)
            except Exception:  # noqa: BLE001 - reported through _on_ack
                pass
        self._channel.close()
        self._channel = None
