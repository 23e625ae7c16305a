"""Shared-memory transport: same node, different processes; one memcpy each side.

Per sender connection the receiver creates a shared arena (a file in /dev/shm, mmapped by
both sides, unlinked as soon as the sender attached so nothing leaks if either crashes) and
talks over a Unix domain socket in a private temp dir; the socket path is the receiver's
``address``. Handshake messages are length-prefixed JSON, later ones binary frames (see
``shm_ring``).

    sender                                   receiver (one thread per connection)
    {"layout"}                        ─────>  compare layouts, create the arena
                                      <─────  {"ok", "layout", "arena", "arena_bytes"}
    mmap the arena, {"t":"attached"}  ─────>  unlink the arena file
    hash+copy pages into a ring slot
    chunk(rid, layer, first, n,
          off, nbytes, checksum)      ─────>  hash the slot in place; if it verifies, copy
                                              it into the reserved blocks (ReceiverBook)
                                      <─────  credit byte: frees the oldest slot
    finish(rid, n)                    ─────>  finish
    bye                               ─────>  clean close; requests still open at bye/EOF fail

Bytes touched per chunk (the minimum for two processes with separate caches): the sender
reads its pages once (``copy_with_checksum`` hashes each 256 KiB piece just before copying
it) and writes the slot; the receiver reads the slot twice (hash, then copy: a FAILED chunk
is never written; the second read hits the CPU cache) and writes its cache once. The sender keeps small chunks
within the first ``window_bytes`` of the arena (``shm_ring.Ring``), so slots are reused
while still cache-resident. With a ``fault_hook`` set, the sender seals the chunk first
(hash), lets the hook mutate it, then copies: the test path, one extra read.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import numpy as np
import torch

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import FaultHook, KVChunk, KVTransferError, check_layouts
from kv_transfer.bytes_ops import copy_with_checksum, tensor_bytes
from kv_transfer.receiver_book import BookedReceiver
from kv_transfer.sender_book import BookedSender
from kv_transfer.shm_ring import (
    ALIGN,
    CHUNK,
    CREDIT,
    FINISH,
    Arena,
    FrameReader,
    Ring,
    frame,
    recv_json,
    send_json,
)


class ShmReceiver(BookedReceiver):
    def __init__(
        self,
        layout: KVLayout,
        cache: PagedKVCache,
        *,
        arena_bytes: int = 64 << 20,
        max_unexpected_bytes: int = 64 << 20,
    ):
        super().__init__(layout, cache, max_unexpected_bytes)
        arena_bytes -= arena_bytes % ALIGN
        if arena_bytes < layout.page_bytes:
            raise ValueError(f"arena_bytes={arena_bytes} is smaller than one page ({layout.page_bytes} bytes)")
        self.arena_bytes = arena_bytes
        self._dir = tempfile.mkdtemp(prefix="splitserve-kv-")  # mode 0700: only this user
        self._path = os.path.join(self._dir, "rx.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self._path)
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []  # connection threads, joined by close()
        self._closed = False
        self._accepter = threading.Thread(target=self._accept_loop, name="kv-shm-accept", daemon=True)
        self._accepter.start()

    @property
    def address(self) -> str:
        return self._path

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        for s in [self._listener, *conns]:  # shutdown wakes the threads blocked on them
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        # a daemon thread still inside a torch call at interpreter exit aborts the process
        # ("terminate called without an active exception"): let them all wind down. The
        # accept thread goes first: once it is gone no connection thread can be added.
        self._accepter.join(5.0)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(5.0)

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener shut down by close()
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._conns.add(sock)
                t = threading.Thread(target=self._serve, args=(sock,), name="kv-shm-recv", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        arena: Arena | None = None
        open_rids: set[str] = set()  # requests with chunks seen but no finish yet
        why = "sender closed the connection without finishing"
        try:
            arena = self._handshake(sock)
            if arena is None:
                return
            frames = FrameReader(sock)
            while True:
                body = frames.next()
                kind = body[:1]
                if kind == b"c":
                    layer, first, n, off, nbytes, checksum = CHUNK.unpack_from(body, 1)
                    rid = body[1 + CHUNK.size :].decode()
                    if off + nbytes > arena.size:
                        raise KVTransferError(f"descriptor [{off}, {off + nbytes}) outside the {arena.size}-byte arena")
                    open_rids.add(rid)
                    # payload: borrowed view of the arena slot, valid until the credit below
                    self.book.on_chunk(KVChunk(rid, layer, first, n, arena.tensor[off : off + nbytes], checksum))
                    sock.sendall(CREDIT)
                elif kind == b"f":
                    (num_chunks,) = FINISH.unpack_from(body, 1)
                    rid = body[1 + FINISH.size :].decode()
                    open_rids.discard(rid)
                    self.book.on_finish(rid, num_chunks)
                elif kind == b"b":
                    return  # requests still open are failed below: they can never finish
                else:
                    raise KVTransferError(f"unknown frame type {kind!r}")
        except Exception as e:  # noqa: BLE001 - EOF, socket error, protocol violation
            why = "receiver closed" if self._closed else f"{type(e).__name__}: {e}"
        finally:
            if open_rids:
                self.book.on_stream_error(open_rids, why)
            with self._lock:
                self._conns.discard(sock)
            sock.close()
            if arena is not None:
                arena.unlink()
                arena.close()

    def _handshake(self, sock: socket.socket) -> Arena | None:
        hello = recv_json(sock)
        try:
            check_layouts(self.layout, KVLayout.from_dict(hello["layout"]), "shm receiver refused the sender")
        except KVLayoutMismatch as e:
            send_json(sock, {"ok": False, "error": str(e), "layout": self.layout.to_dict()})
            return None
        arena = Arena.create(self.arena_bytes)
        try:
            send_json(
                sock, {"ok": True, "layout": self.layout.to_dict(), "arena": arena.path, "arena_bytes": arena.size}
            )
            if recv_json(sock).get("t") != "attached":
                raise KVTransferError("sender did not attach the arena")
        finally:
            arena.unlink()  # mapped on both sides now (or the handshake failed): nothing to leak
        return arena


class ShmSender(BookedSender):
    def __init__(
        self,
        layout: KVLayout,
        *,
        fault_hook: FaultHook | None = None,
        stall_timeout_s: float = 60.0,
        window_bytes: int = 8 << 20,
    ):
        super().__init__(layout, fault_hook=fault_hook)
        if window_bytes <= 0:
            raise ValueError(f"window_bytes must be positive, got {window_bytes}")
        self.stall_timeout_s = stall_timeout_s
        self.window_bytes = window_bytes
        self._sock: socket.socket | None = None
        self._arena: Arena | None = None
        self._cond = threading.Condition()
        self._ring: Ring | None = None  # guarded by _cond: allocated by the worker, freed by credits
        self._link_error: str | None = None
        self._reader: threading.Thread | None = None

    def connect(self, peer: str, timeout_s: float = 30.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(peer)
            send_json(sock, {"layout": self.layout.to_dict()})
            reply = recv_json(sock)
            check_layouts(self.layout, KVLayout.from_dict(reply["layout"]), f"shm receiver at {peer}")
            if not reply["ok"]:
                raise KVTransferError(f"shm receiver at {peer} refused: {reply['error']}")
            self._arena = Arena(reply["arena"], reply["arena_bytes"], create=False)
            send_json(sock, {"t": "attached"})
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._ring = Ring(self._arena.size, self.window_bytes)
        self.max_chunk_bytes = self._arena.size
        self._reader = threading.Thread(target=self._read_credits, name="kv-shm-credits", daemon=True)
        self._reader.start()
        self._start(f"kv-shm-send->{peer}")

    def _read_credits(self) -> None:
        try:
            while True:
                data = self._sock.recv(4096)
                if not data:
                    raise EOFError("receiver closed the connection")
                if data.count(CREDIT) != len(data):
                    raise KVTransferError(f"unexpected bytes from the receiver: {data[:16]!r}")
                with self._cond:
                    self._ring.free(len(data))
                    self._cond.notify_all()
        except (EOFError, OSError, KVTransferError, ValueError) as e:
            with self._cond:
                self._link_error = f"{type(e).__name__}: {e}"
                self._cond.notify_all()

    def _alloc(self, nbytes: int) -> int:
        """Offset of a free slot of at least ``nbytes`` (waits for credits)."""
        n = -(-nbytes // ALIGN) * ALIGN
        if n > self._arena.size:
            raise KVTransferError(f"chunk of {n} bytes does not fit the {self._arena.size}-byte arena")
        deadline = time.monotonic() + self.stall_timeout_s
        with self._cond:
            while True:
                if self._link_error:
                    raise KVTransferError(f"receiver connection lost: {self._link_error}")
                off = self._ring.alloc(n)
                if off is not None:
                    return off
                if not self._cond.wait(deadline - time.monotonic()):
                    raise KVTransferError(f"receiver freed no arena space within {self.stall_timeout_s}s")

    def _transmit_pages(self, rid: str, layer: int, first_page: int, pages: torch.Tensor) -> None:
        if self.fault_hook is not None:  # tests: seal, mutate, then copy (super -> _transmit_chunk)
            super()._transmit_pages(rid, layer, first_page, pages)
            return
        src = tensor_bytes(pages).numpy()  # [nbytes] uint8
        off = self._alloc(src.nbytes)
        # the checksum of each piece is taken from ``pages`` just before the piece is copied
        checksum = copy_with_checksum(self._arena.array[off : off + src.nbytes], src)
        self._send_chunk(rid, layer, first_page, pages.shape[0], off, src.nbytes, checksum)

    def _transmit_chunk(self, chunk: KVChunk) -> None:
        src = tensor_bytes(chunk.payload).numpy()
        off = self._alloc(src.nbytes)
        np.copyto(self._arena.array[off : off + src.nbytes], src)
        self._send_chunk(
            chunk.request_id, chunk.layer, chunk.first_page, chunk.num_pages, off, src.nbytes, chunk.checksum
        )

    def _send_chunk(self, rid: str, layer: int, first: int, n: int, off: int, nbytes: int, checksum: int) -> None:
        self._sock.sendall(frame(b"c" + CHUNK.pack(layer, first, n, off, nbytes, checksum) + rid.encode()))

    def _transmit_finish(self, request_id: str, num_chunks: int) -> None:
        self._sock.sendall(frame(b"f" + FINISH.pack(num_chunks) + request_id.encode()))

    def _disconnect(self) -> None:
        if self._sock is None:
            return
        worker_idle = self._thread is None or not self._thread.is_alive()
        try:
            if worker_idle and self.book.broken is None:
                self._sock.sendall(frame(b"b"))
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not None:
            self._reader.join(5.0)
        if worker_idle:  # never unmap under a worker that is still copying
            self._arena.close()
