"""Pieces of the shm transport: the shared arena, the sender's slot allocator, framing, and
the receiver's read-only mapping of a sender's shared cache.

Arena: a file in /dev/shm created by the receiver and mmapped by both processes (unlinked
once the sender attached). Ring: the sender carves the arena into FIFO slots; the receiver
frees them in the order it consumed them (one credit byte per chunk). Frames: after the
JSON handshake the sender's messages are ``[u32 length][body]`` with a one-byte type tag
and struct-packed fields, read through a buffered reader (one ``recv`` serves many frames)
that also collects file descriptors passed with SCM_RIGHTS (the ``m`` frame carries one).
CacheMap: a sender's shared PagedKVCache (a sealed memfd) mapped read-only by the receiver,
``rows: [num_layers, num_blocks, page_bytes]`` uint8.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
import tempfile
import uuid
from collections import deque

import numpy as np
import torch

ALIGN = 64  # slots start at multiples of this (cache-line aligned memcpy)
LEN = struct.Struct("<I")
# chunk frame body: b"c" + CHUNK(layer, first_page, num_pages, offset, nbytes, checksum) + rid
CHUNK = struct.Struct("<IIIQQI")
FINISH = struct.Struct("<I")  # finish frame body: b"f" + FINISH(num_chunks) + rid
# map frame body: b"m" + MAP(map_index, num_blocks), with the cache's memfd attached (SCM_RIGHTS)
MAP = struct.Struct("<II")
# by-reference chunk body: b"d" + DESC(map_index, layer, first_page, num_pages, checksum,
# len(rid)) + rid + num_pages x u32 source block ids (in page order)
DESC = struct.Struct("<IIIIII")
MAX_FRAME = 1 << 20  # frames carry descriptors, never page bytes
MAX_FDS = 4  # file descriptors accepted with one recv (more: protocol violation)
CREDIT = b"\x01"  # receiver -> sender, one byte per consumed ring chunk: frees the oldest slot
ACK = b"\x02"  # receiver -> sender, one byte per by-reference chunk: its source pages were read


def send_json(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError("peer closed the connection")
        buf += part
    return bytes(buf)


def recv_json(sock: socket.socket) -> dict:
    """One handshake message. Reads exactly its bytes, so frames that follow stay unread."""
    (n,) = LEN.unpack(_recv_exact(sock, LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"{n}-byte handshake message")
    return json.loads(_recv_exact(sock, n))


class FrameReader:
    """Buffered reader of ``[u32 length][body]`` frames from a stream socket. File
    descriptors that arrive with the bytes (SCM_RIGHTS) queue up in ``fds`` in arrival
    order: an fd is attached to the first bytes of the frame that carries it, so it is
    queued by the time that frame is returned. The owner closes leftovers (``close_fds``)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds: deque[int] = deque()
        self._buf = bytearray()
        self._pos = 0  # start of the first unread frame in _buf

    def ready(self) -> bool:
        """Whether a whole frame is already buffered (``next`` returns without a recv)."""
        avail = len(self._buf) - self._pos
        return avail >= LEN.size and avail >= LEN.size + LEN.unpack_from(self._buf, self._pos)[0]

    def take_fd(self) -> int:
        if not self.fds:
            raise ValueError("frame expects a file descriptor, none arrived")
        return self.fds.popleft()

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.popleft())

    def next(self) -> bytes:
        while True:
            avail = len(self._buf) - self._pos
            if avail >= LEN.size:
                (n,) = LEN.unpack_from(self._buf, self._pos)
                if n > MAX_FRAME:
                    raise ValueError(f"{n}-byte frame (limit {MAX_FRAME})")
                if avail >= LEN.size + n:
                    start = self._pos + LEN.size
                    self._pos = start + n
                    return bytes(self._buf[start : self._pos])
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            # recvmsg, never recv: a plain recv would drop (and close) any attached fd
            part, fds, flags, _ = socket.recv_fds(self.sock, 1 << 16, MAX_FDS)
            self.fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise ValueError(f"more than {MAX_FDS} file descriptors in one message")
            if not part:
                raise EOFError("peer closed the connection")
            self._buf += part


def frame(body: bytes) -> bytes:
    return LEN.pack(len(body)) + body


def send_frame_with_fd(sock: socket.socket, body: bytes, fd: int) -> None:
    """One frame with ``fd`` attached to its first byte (the receiver gets its own copy)."""
    data = frame(body)
    sent = socket.send_fds(sock, [data], [fd])
    if sent < len(data):
        sock.sendall(data[sent:])


class CacheMap:
    """A sender's shared PagedKVCache, mapped read-only: ``rows: [num_layers, num_blocks,
    page_bytes]`` uint8 (numpy, read-only). Takes ownership of ``fd`` (closed at once: the
    mapping keeps the memory). The file must be sealed against shrinking (PagedKVCache
    seals it), so no read through the mapping can fault on a truncated file. ``close``
    unmaps; if a view of ``rows`` is still alive it is unmapped when that view dies."""

    def __init__(self, fd: int, num_layers: int, num_blocks: int, page_bytes: int):
        try:
            nbytes = num_layers * num_blocks * page_bytes
            if num_blocks < 1:
                raise ValueError(f"shared cache of {num_blocks} blocks")
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ValueError(f"shared cache file holds {size} bytes, {num_blocks} blocks need {nbytes}")
            if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                raise ValueError("shared cache file is not sealed against shrinking")
            self._mm: mmap.mmap | None = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.num_blocks = num_blocks
        self.rows: np.ndarray | None = np.frombuffer(self._mm, np.uint8).reshape(num_layers, num_blocks, page_bytes)

    def close(self) -> None:
        self.rows = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view still exports the buffer: it unmaps when freed
                pass
            self._mm = None


class Arena:
    """An mmapped shared file. ``tensor: [size] uint8`` and ``array`` (numpy, same memory)
    view it without pinning the mapping: only the thread that owns the arena may touch
    them, and never after ``close``."""

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
        self.array = self.tensor.numpy()  # via torch: numpy would hold a buffer export on the mmap

    @staticmethod
    def create(size: int) -> Arena:
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        return Arena(os.path.join(root, f"splitserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"), size, True)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.tensor = self.array = None
        self._mm.close()


class Ring:
    """Sender-side allocator of arena slots; not thread-safe (the sender guards it).

    Slots ``[off, end)`` are handed out in FIFO order and freed oldest first, so the live
    slots form one run ``[tail, head)`` or, once wrapped, ``[tail, ..) + [0, head)``; a new
    slot goes at ``head`` or, if it does not fit before the limit, at 0 (never straddling).
    An empty ring restarts at 0. Slots up to ``window`` bytes stay inside ``[0, window)``:
    a small hot footprint that the receiver's reads and the sender's next writes find in
    the CPU cache. A larger slot may use the whole arena.
    """

    def __init__(self, size: int, window: int):
        self.size = size
        self.window = min(window, size)
        self._slots: deque[tuple[int, int]] = deque()

    def __len__(self) -> int:
        return len(self._slots)

    def alloc(self, n: int) -> int | None:
        """Offset of a free ``n``-byte slot (``n`` a multiple of ALIGN), or None if full now."""
        if not 0 < n <= self.size:
            raise ValueError(f"slot of {n} bytes in a {self.size}-byte arena")
        limit = self.window if n <= self.window else self.size
        if not self._slots:
            off = 0
        else:
            tail, head = self._slots[0][0], self._slots[-1][1]
            if head > tail:  # one run [tail, head): room after it, else before it
                off = head if head + n <= limit else (0 if n <= tail else None)
            else:  # wrapped: the free gap is [head, tail)
                off = head if head + n <= min(tail, limit) else None
        if off is not None:
            self._slots.append((off, off + n))
        return off

    def free(self, count: int) -> None:
        """The receiver consumed the ``count`` oldest slots."""
        if count > len(self._slots):
            raise ValueError(f"{count} credits for {len(self._slots)} slots in flight")
        for _ in range(count):
            self._slots.popleft()
