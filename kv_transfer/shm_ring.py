"""Pieces of the shm transport: the shared arena, the sender's slot allocator, and framing.

Arena: a file in /dev/shm created by the receiver and mmapped by both processes (unlinked
once the sender attached). Ring: the sender carves the arena into FIFO slots; the receiver
frees them in the order it consumed them (one credit byte per chunk). Frames: after the
JSON handshake the sender's messages are ``[u32 length][body]`` with a one-byte type tag
and struct-packed fields, read through a buffered reader (one ``recv`` serves many frames).
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import tempfile
import uuid
from collections import deque

import torch

ALIGN = 64  # slots start at multiples of this (cache-line aligned memcpy)
LEN = struct.Struct("<I")
# chunk frame body: b"c" + CHUNK(layer, first_page, num_pages, offset, nbytes, checksum) + rid
CHUNK = struct.Struct("<IIIQQI")
FINISH = struct.Struct("<I")  # finish frame body: b"f" + FINISH(num_chunks) + rid
MAX_FRAME = 1 << 20  # frames carry descriptors, never page bytes
CREDIT = b"\x01"  # receiver -> sender, one byte per consumed chunk: frees the oldest slot


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
    """Buffered reader of ``[u32 length][body]`` frames from a stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0  # start of the first unread frame in _buf

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
            part = self.sock.recv(1 << 16)
            if not part:
                raise EOFError("peer closed the connection")
            self._buf += part


def frame(body: bytes) -> bytes:
    return LEN.pack(len(body)) + body


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
