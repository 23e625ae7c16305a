"""Shared-memory transport: same node, different processes; one memcpy in total when the
sender's cache is shared (``PagedKVCache(shared=True)``), one per side otherwise.

Per sender connection the receiver creates a shared arena (a file in /dev/shm, mmapped by
both sides, unlinked as soon as the sender attached so nothing leaks if either crashes) and
talks over a Unix domain socket in a private temp dir; the socket path is the receiver's
``address``. Handshake messages are length-prefixed JSON, later ones binary frames (see
``shm_ring``).

    sender                                   receiver (one thread per connection)
    {"layout"}                        ─────>  compare layouts, create the arena
                                      <─────  {"ok", "layout", "arena", "arena_bytes"}
    mmap the arena, {"t":"attached"}  ─────>  unlink the arena file

    send_blocks(rid, layer, first, cache, ids)        (by reference: the one-copy path)
      first use of ``cache`` here:
      map(index, num_blocks) + memfd ─────>  mmap the sender's cache read-only (CacheMap)
      (SCM_RIGHTS)
      hash pages cache[layer, ids] in
      place, at the send_blocks call
      desc(index, layer, first, n,
           checksum, rid, ids)        ─────>  check ids < num_blocks, n == len(ids); copy
                                              the pages from the mapping straight into the
                                              reserved blocks, hashing the bytes as they
                                              land (ReceiverBook.on_shared_pages, under
                                              its lock); mismatch -> request FAILED
                                      <─────  ack byte: those source pages were read
    send(rid, layer, first, pages)                    (by copy: the ring)
      hash+copy pages into a ring slot
      chunk(rid, layer, first, n,
            off, nbytes, checksum)    ─────>  hash the slot in place; if it verifies, copy
                                              it into the reserved blocks
                                      <─────  credit byte: frees the oldest slot
    finish(rid, n)                    ─────>  finish
    DONE once finish is out and every desc of rid is acked (the caller then frees the
    source blocks, so nothing may still read them)
    bye                               ─────>  clean close; requests still open at bye/EOF fail
    (credit and ack bytes go out in one write once no further frame is buffered)

By reference, every byte crosses the memory bus once: the sender hashes its pages in place
(xxh3) and the receiver copies them once, hashing on the way (``bytes_ops.
copy_pages_with_checksum``: with the native kernel each 64-byte stripe is stored from and
hashed from the same register, in one pass at memcpy speed; without it each 512 KiB piece is
hashed from the destination while it is still in L2). Both load the kernel when they are
created, before any lock is held. The
checksum is taken during ``send_blocks``, so a source block the caller writes before DONE
(it must not) fails the request at the receiver instead of landing silently; hashing the
destination, not the source, means a torn read can never verify either. A failing chunk may
leave bytes in the request's own reserved blocks, never admitted. With chunked prefill the
caller passes the last, partially filled page of a non-final chunk by copy (``send``):
the next chunk writes it again.

By copy (``send``, a non-shared cache, or a ``fault_hook``): the sender reads its pages
once (``copy_with_checksum`` hashes each 256 KiB piece just before copying it) and writes
the slot; the receiver reads the slot twice (hash, then copy: a FAILED chunk is never
written; the second read hits the CPU cache) and writes its cache once. Small chunks stay
within the first ``window_bytes`` of the arena (``shm_ring.Ring``), so slots are reused while
still cache-resident. With a ``fault_hook`` set, the sender seals the chunk first (hash),
lets the hook mutate it, then copies: the test path, one extra read.

Lifecycles: a sender cache's memfd stays open as long as the PagedKVCache lives (the sender
holds a reference to every cache it shared, so at least as long as the connection); the
receiver closes its mapping when that connection ends. Nothing is named in the file
system after the handshake, so a SIGKILL on either side leaks no shared memory.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter, deque

import numpy as np
import torch

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import FaultHook, KVChunk, KVLinkBroken, KVTransferError, PageSink, check_layouts
from kv_transfer.bytes_ops import checksum_pages, copy_with_checksum, page_rows, tensor_bytes, warm_native
from kv_transfer.receiver_book import BookedReceiver
from kv_transfer.sender_book import BookedSender
from kv_transfer.shm_ring import (
    ACK,
    ALIGN,
    CHUNK,
    CREDIT,
    DESC,
    FINISH,
    MAP,
    MAX_FRAME,
    Arena,
    CacheMap,
    FrameReader,
    Ring,
    frame,
    recv_json,
    send_frame_with_fd,
    send_json,
)

MAX_MAPS = 16  # shared caches one connection maps; send_blocks copies from any further one


class ShmReceiver(BookedReceiver):
    def __init__(
        self,
        layout: KVLayout,
        cache: PagedKVCache | PageSink,
        *,
        arena_bytes: int = 64 << 20,
        max_unexpected_bytes: int = 64 << 20,
    ):
        super().__init__(layout, cache, max_unexpected_bytes)
        arena_bytes -= arena_bytes % ALIGN
        if arena_bytes < layout.page_bytes:
            raise ValueError(f"arena_bytes={arena_bytes} is smaller than one page ({layout.page_bytes} bytes)")
        self.arena_bytes = arena_bytes
        warm_native()  # the page copy's kernel, loaded before any chunk (and lock) can need it
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
        frames = FrameReader(sock)
        maps: list[CacheMap | str] = []  # by map index: the sender's mapped cache, or why it failed
        open_rids: set[str] = set()  # requests with chunks seen but no finish yet
        replies = bytearray()  # credits and acks not sent yet: flushed before waiting for frames
        why = "sender closed the connection without finishing"
        try:
            arena = self._handshake(sock)
            if arena is None:
                return
            while True:
                if replies and not frames.ready():  # one send (one wake-up of the sender) per batch
                    sock.sendall(replies)
                    replies.clear()
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
                    replies += CREDIT
                elif kind == b"d":
                    open_rids.add(self._on_descriptor(body, maps))
                    replies += ACK  # after the copy: the sender may free the source pages now
                elif kind == b"m":
                    index, num_blocks = MAP.unpack_from(body, 1)
                    fd = frames.take_fd()
                    if index != len(maps):
                        os.close(fd)
                        raise KVTransferError(f"map frame for index {index}, expected {len(maps)}")
                    maps.append(self._map(fd, num_blocks))
                elif kind == b"f":
                    (num_chunks,) = FINISH.unpack_from(body, 1)
                    rid = body[1 + FINISH.size :].decode()
                    open_rids.discard(rid)
                    self.book.on_finish(rid, num_chunks)
                elif kind == b"b":
                    if replies:  # the sender waits for the last acks before it closes
                        sock.sendall(replies)
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
            frames.close_fds()
            for m in maps:
                if isinstance(m, CacheMap):
                    m.close()
            if arena is not None:
                arena.unlink()
                arena.close()

    def _map(self, fd: int, num_blocks: int) -> CacheMap | str:
        """Map a sender's shared cache; on failure, why (its descriptors then fail their requests)."""
        lay = self.layout
        try:
            return CacheMap(fd, lay.num_layers, num_blocks, lay.page_bytes)
        except (OSError, ValueError) as e:
            return f"the sender's shared cache could not be mapped: {type(e).__name__}: {e}"

    def _on_descriptor(self, body: bytes, maps: list[CacheMap | str]) -> str:
        """Apply one by-reference chunk; returns its request id. Anything wrong with the
        descriptor fails that request only (the sender may be buggy, the receiver stays up)."""
        index, layer, first, n, checksum, rid_len = DESC.unpack_from(body, 1)
        at = 1 + DESC.size + rid_len
        rid = body[1 + DESC.size : at].decode()
        raw = body[at:]
        problem = None
        if index >= len(maps):
            problem = f"descriptor names shared cache {index}, only {len(maps)} mapped"
        elif isinstance(maps[index], str):
            problem = maps[index]
        elif n < 1 or len(raw) != 4 * n:
            problem = f"descriptor claims {n} pages but carries {len(raw) / 4:g} block ids"
        elif layer >= self.layout.num_layers:
            problem = f"descriptor for layer {layer}, layout has {self.layout.num_layers} layers"
        if problem is None:
            m = maps[index]
            ids = np.frombuffer(raw, dtype="<u4")
            if int(ids.max()) >= m.num_blocks:
                problem = f"descriptor block id {int(ids.max())} outside the sender's {m.num_blocks} blocks"
            else:
                self.book.on_shared_pages(rid, layer, first, m.rows[layer], ids.tolist(), checksum)
        if problem is not None:
            self.book.on_bad_chunk(rid, f"{problem} (layer {layer}, first_page {first})")
        return rid

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
    _acks_finish = True  # DONE once finish is out and every by-reference chunk is acked

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
        warm_native()  # send_blocks hashes on the caller's thread: no first-call build there
        self._sock: socket.socket | None = None
        self._arena: Arena | None = None
        self._cond = threading.Condition()
        # guarded by _cond: the ring (allocated by the worker, freed by credits); the
        # by-reference chunks not yet acked, oldest first, and their count per request;
        # requests whose finish is out but still wait for acks
        self._ring: Ring | None = None
        self._unacked: deque[str] = deque()
        self._pending: Counter[str] = Counter()
        self._finish_sent: set[str] = set()
        self._link_error: str | None = None
        self._reader: threading.Thread | None = None
        # shared caches, by id(cache): (map index, the cache (kept alive, so its fd stays
        # open while this connection may name it), its [L, num_blocks, page_bytes] rows)
        self._caches: dict[int, tuple[int, PagedKVCache, np.ndarray]] = {}
        self._by_index: list[PagedKVCache] = []  # the same caches, by map index
        self._caches_lock = threading.Lock()
        self._mapped = 0  # map frames sent, for indices 0.._mapped-1 (worker thread only)

    @property
    def link_error(self) -> str | None:
        return self.book.broken or self._link_error  # the credit reader sees EOF first

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
        self._reader = threading.Thread(target=self._read_replies, name="kv-shm-replies", daemon=True)
        self._reader.start()
        self._start(f"kv-shm-send->{peer}")

    def _read_replies(self) -> None:
        try:
            while True:
                data = self._sock.recv(4096)
                if not data:
                    raise EOFError("receiver closed the connection")
                credits, acks = data.count(CREDIT), data.count(ACK)
                if credits + acks != len(data):
                    raise KVTransferError(f"unexpected bytes from the receiver: {data[:16]!r}")
                done = []
                with self._cond:
                    if credits:
                        self._ring.free(credits)
                    for _ in range(acks):
                        if not self._unacked:
                            raise KVTransferError("acknowledgement for no outstanding descriptor")
                        rid = self._unacked.popleft()
                        self._pending[rid] -= 1
                        if not self._pending[rid]:
                            del self._pending[rid]
                            if rid in self._finish_sent:
                                self._finish_sent.discard(rid)
                                done.append(rid)
                    self._cond.notify_all()
                for rid in done:
                    self.book.done(rid)
        except (EOFError, OSError, KVTransferError, ValueError) as e:
            with self._cond:
                self._link_error = f"{type(e).__name__}: {e}"
                waiting = list(self._pending)  # their source pages may still be read: not DONE
                self._pending.clear()
                self._unacked.clear()
                self._finish_sent.clear()
                self._cond.notify_all()
            for rid in waiting:
                self.book.fail(rid, f"receiver connection lost before it acknowledged every chunk: {self._link_error}")

    def _alloc(self, nbytes: int) -> int:
        """Offset of a free slot of at least ``nbytes`` (waits for credits)."""
        n = -(-nbytes // ALIGN) * ALIGN
        if n > self._arena.size:
            raise KVTransferError(f"chunk of {n} bytes does not fit the {self._arena.size}-byte arena")
        deadline = time.monotonic() + self.stall_timeout_s
        with self._cond:
            while True:
                if self._link_error:
                    raise KVLinkBroken(f"receiver connection lost: {self._link_error}")
                off = self._ring.alloc(n)
                if off is not None:
                    return off
                if not self._cond.wait(deadline - time.monotonic()):
                    raise KVTransferError(f"receiver freed no arena space within {self.stall_timeout_s}s")

    def send_blocks(
        self, request_id: str, layer: int, first_page: int, cache: PagedKVCache, block_ids: list[int]
    ) -> None:
        """By reference when ``cache`` is shared (see the module docstring): the pages are
        hashed here, now, and the receiver copies them out of ``cache`` later. Otherwise (or
        with a fault hook, or past MAX_MAPS caches) by copy, through the ring."""
        entry = self._cache_entry(cache) if self.fault_hook is None else None
        if entry is None:
            super().send_blocks(request_id, layer, first_page, cache, block_ids)
            return
        self._check_chunk(layer, first_page)
        ids = [int(b) for b in block_ids]
        if not ids or min(ids) < 0 or max(ids) >= cache.num_blocks:
            raise ValueError(f"block ids must be non-empty and in [0, {cache.num_blocks}), got {block_ids}")
        if DESC.size + 8 + len(request_id.encode()) + 4 * len(ids) > MAX_FRAME:
            raise ValueError(f"{len(ids)} pages do not fit one descriptor; send fewer pages per chunk")
        index, _, rows = entry
        checksum = checksum_pages(rows[layer], ids)  # the bytes as they are now (see the docstring)
        self._queue_blocks(request_id, layer, first_page, index, cache, ids, checksum)

    def _cache_entry(self, cache: PagedKVCache) -> tuple[int, PagedKVCache, np.ndarray] | None:
        if cache.shared_fd is None:
            return None
        with self._caches_lock:
            entry = self._caches.get(id(cache))
            if entry is None and len(self._caches) < MAX_MAPS:
                check_layouts(self.layout, cache.layout, "send_blocks: the cache")
                rows = page_rows(cache.kv, cache.layout.page_bytes)
                entry = self._caches[id(cache)] = (len(self._caches), cache, rows)
                self._by_index.append(cache)
            return entry

    def _transmit_blocks(
        self, rid: str, layer: int, first: int, index: int, cache: PagedKVCache, ids: list[int], checksum: int
    ) -> None:
        while self._mapped <= index:  # first descriptor naming this cache: send its memfd first
            with self._caches_lock:
                shared = self._by_index[self._mapped]
            send_frame_with_fd(self._sock, b"m" + MAP.pack(self._mapped, shared.num_blocks), shared.shared_fd)
            self._mapped += 1
        rid_bytes = rid.encode()
        body = b"".join(
            (
                b"d",
                DESC.pack(index, layer, first, len(ids), checksum, len(rid_bytes)),
                rid_bytes,
                np.asarray(ids, dtype="<u4").tobytes(),
            )
        )
        with self._cond:  # registered before it is sent: the ack cannot overtake it
            if self._link_error:
                raise KVTransferError(f"receiver connection lost: {self._link_error}")
            self._unacked.append(rid)
            self._pending[rid] += 1
        self._sock.sendall(frame(body))

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
        with self._cond:
            if self._pending[request_id]:  # DONE from the reader, once the last ack is in
                self._finish_sent.add(request_id)
                return
        self.book.done(request_id)  # nothing by reference in flight (a Counter lookup inserts nothing)

    def _disconnect(self, ack_timeout_s: float = 10.0) -> None:
        if self._sock is None:
            return
        worker_idle = self._thread is None or not self._thread.is_alive()
        try:
            if worker_idle and self.book.broken is None:
                self._sock.sendall(frame(b"b"))
                with self._cond:
                    waiting = bool(self._pending)
                if waiting:  # the receiver acks what is in flight, then closes on bye: EOF
                    self._sock.shutdown(socket.SHUT_WR)
                    self._reader.join(ack_timeout_s)
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not None:
            self._reader.join(5.0)
        if worker_idle:  # never unmap under a worker that is still copying
            self._arena.close()
