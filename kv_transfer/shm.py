"""Shared-memory transport: same node, different processes; one memcpy each side.

Per sender connection the receiver creates a shared arena (a file in /dev/shm, mmapped by
both sides, unlinked as soon as the sender attached so nothing leaks if either crashes) and
talks over a Unix domain socket (length-prefixed JSON messages) in a private temp dir; the
socket path is the receiver's ``address``.

    sender                                   receiver (one thread per connection)
    {"layout"}                        ─────>  compare layouts, create the arena
                                      <─────  {"ok", "layout", "arena", "arena_bytes"}
    mmap the arena, {"attached"}      ─────>  unlink the arena file
    copy pages into arena[off:off+n]
    {"t":"c", rid, layer, first, n,
     off, nbytes, span, crc}          ─────>  verify + write into the cache (ReceiverBook)
                                      <─────  {"t":"credit", "span"}   frees the arena slot
    {"t":"f", rid, n}                 ─────>  finish
    {"t":"bye"}                       ─────>  clean close; requests still open at bye/EOF fail

The arena is a ring: the sender allocates at ``head`` (skipping to offset 0 when a chunk
would straddle the end; restarting at 0 whenever the ring is empty), the receiver frees
slots in the order it consumed them, so ``head - tail <= arena_bytes`` always holds and
slots never overlap. A chunk larger than the arena is refused by ``send``.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid

import torch

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import FaultHook, KVChunk, KVTransferError, check_layouts, tensor_bytes
from kv_transfer.receiver_book import BookedReceiver
from kv_transfer.sender_book import BookedSender

_LEN = struct.Struct("!I")
_ALIGN = 64  # arena slots start at multiples of this (keeps dtype views and memcpy aligned)


def _send_msg(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError("peer closed the connection")
        buf += part
    return bytes(buf)


def _recv_msg(sock: socket.socket) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return json.loads(_recv_exact(sock, n))


class _Arena:
    """An mmapped shared file; ``tensor: [size] uint8`` views it. The tensor does not keep
    the mapping alive: only the thread that owns the arena may touch it, and never after
    ``close``."""

    def __init__(self, path: str, size: int, create: bool):
        self.path, self.size = path, size
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)

    @staticmethod
    def create(size: int) -> _Arena:
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        return _Arena(os.path.join(root, f"splitserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"), size, True)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.tensor = None
        self._mm.close()


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
        arena_bytes -= arena_bytes % _ALIGN
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
        self._closed = False
        threading.Thread(target=self._accept_loop, name="kv-shm-accept", daemon=True).start()

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
            threading.Thread(target=self._serve, args=(sock,), name="kv-shm-recv", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        arena: _Arena | None = None
        open_rids: set[str] = set()  # requests with chunks seen but no finish yet
        why = "sender closed the connection without finishing"
        try:
            arena = self._handshake(sock)
            if arena is None:
                return
            while True:
                m = _recv_msg(sock)
                if m["t"] == "c":
                    off, nbytes = m["off"], m["nbytes"]
                    if off < 0 or nbytes < 0 or off + nbytes > arena.size:
                        raise KVTransferError(f"descriptor [{off}, {off + nbytes}) outside the {arena.size}-byte arena")
                    open_rids.add(m["rid"])
                    # payload: borrowed view of the arena slot, valid until the credit below
                    chunk = KVChunk(
                        m["rid"], m["layer"], m["first"], m["n"], arena.tensor[off : off + nbytes], m["crc"]
                    )
                    self.book.on_chunk(chunk)
                    del chunk
                    _send_msg(sock, {"t": "credit", "span": m["span"]})
                elif m["t"] == "f":
                    open_rids.discard(m["rid"])
                    self.book.on_finish(m["rid"], m["n"])
                elif m["t"] == "bye":
                    return  # requests still open are failed below: they can never finish
                else:
                    raise KVTransferError(f"unknown message type {m['t']!r}")
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

    def _handshake(self, sock: socket.socket) -> _Arena | None:
        hello = _recv_msg(sock)
        try:
            check_layouts(self.layout, KVLayout.from_dict(hello["layout"]), "shm receiver refused the sender")
        except KVLayoutMismatch as e:
            _send_msg(sock, {"ok": False, "error": str(e), "layout": self.layout.to_dict()})
            return None
        arena = _Arena.create(self.arena_bytes)
        try:
            _send_msg(
                sock, {"ok": True, "layout": self.layout.to_dict(), "arena": arena.path, "arena_bytes": arena.size}
            )
            if _recv_msg(sock).get("t") != "attached":
                raise KVTransferError("sender did not attach the arena")
        finally:
            arena.unlink()  # mapped on both sides now (or the handshake failed): nothing to leak
        return arena


class ShmSender(BookedSender):
    def __init__(self, layout: KVLayout, *, fault_hook: FaultHook | None = None, stall_timeout_s: float = 60.0):
        super().__init__(layout, fault_hook=fault_hook)
        self.stall_timeout_s = stall_timeout_s
        self._sock: socket.socket | None = None
        self._arena: _Arena | None = None
        self._cond = threading.Condition()
        # ring counters, both monotonic and guarded by _cond: [tail, head) is in flight
        self._head = 0  # bytes allocated so far (worker thread)
        self._tail = 0  # bytes freed by receiver credits (reader thread)
        self._link_error: str | None = None
        self._reader: threading.Thread | None = None

    def connect(self, peer: str, timeout_s: float = 30.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(peer)
            _send_msg(sock, {"layout": self.layout.to_dict()})
            reply = _recv_msg(sock)
            check_layouts(self.layout, KVLayout.from_dict(reply["layout"]), f"shm receiver at {peer}")
            if not reply["ok"]:
                raise KVTransferError(f"shm receiver at {peer} refused: {reply['error']}")
            self._arena = _Arena(reply["arena"], reply["arena_bytes"], create=False)
            _send_msg(sock, {"t": "attached"})
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.max_chunk_bytes = self._arena.size - self._arena.size % _ALIGN
        self._reader = threading.Thread(target=self._read_credits, name="kv-shm-credits", daemon=True)
        self._reader.start()
        self._start(f"kv-shm-send->{peer}")

    def _read_credits(self) -> None:
        try:
            while True:
                m = _recv_msg(self._sock)
                if m.get("t") != "credit":
                    raise KVTransferError(f"unexpected message from the receiver: {m!r}")
                with self._cond:
                    self._tail += m["span"]
                    self._cond.notify_all()
        except (EOFError, OSError, KVTransferError, ValueError, KeyError) as e:
            with self._cond:
                self._link_error = f"{type(e).__name__}: {e}"
                self._cond.notify_all()

    def _alloc(self, nbytes: int) -> tuple[int, int]:
        """Reserve ``nbytes`` contiguous arena bytes at a 64-byte aligned offset:
        (offset, span freed by the credit)."""
        size = self._arena.size
        n = -(-nbytes // _ALIGN) * _ALIGN
        if n > size:
            raise KVTransferError(f"chunk of {n} bytes does not fit the {size}-byte arena")
        deadline = time.monotonic() + self.stall_timeout_s
        with self._cond:
            while True:
                if self._link_error:
                    raise KVTransferError(f"receiver connection lost: {self._link_error}")
                if self._head == self._tail:  # ring empty (no credit outstanding): restart at 0
                    self._head = self._tail = -(-self._head // size) * size
                pos = self._head % size
                span = n + (size - pos if pos + n > size else 0)  # skip the end if it would straddle
                if size - (self._head - self._tail) >= span:
                    break
                if not self._cond.wait(deadline - time.monotonic()):
                    raise KVTransferError(f"receiver freed no arena space within {self.stall_timeout_s}s")
            self._head += span
        return (0 if span > n else pos), span

    def _transmit_chunk(self, chunk: KVChunk) -> None:
        src = tensor_bytes(chunk.payload)  # [nbytes] uint8
        n = src.numel()
        off, span = self._alloc(n)
        self._arena.tensor[off : off + n].copy_(src)
        msg = {"t": "c", "rid": chunk.request_id, "layer": chunk.layer, "first": chunk.first_page, "n": chunk.num_pages}
        _send_msg(self._sock, msg | {"off": off, "nbytes": n, "span": span, "crc": chunk.checksum})

    def _transmit_finish(self, request_id: str, num_chunks: int) -> None:
        _send_msg(self._sock, {"t": "f", "rid": request_id, "n": num_chunks})

    def _disconnect(self) -> None:
        if self._sock is None:
            return
        worker_idle = self._thread is None or not self._thread.is_alive()
        try:
            if worker_idle and self.book.broken is None:
                _send_msg(self._sock, {"t": "bye"})
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not None:
            self._reader.join(5.0)
        if worker_idle:  # never unmap under a worker that is still copying
            self._arena.close()
