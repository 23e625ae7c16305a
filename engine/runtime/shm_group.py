"""The "shm" group backend: a Communicator for the ranks of one group on ONE node, over shared
memory (issues 13 and 14: the one-node path for attention offload and expert parallelism; TP
groups may use it too). Same contract as engine/parallel.py's communicators.

Channels. Every ordered pair of ranks (src -> dst) has one ring of ``ring_bytes`` in a memfd
that src creates and writes and dst maps and reads; every unordered pair has one Unix stream
socket (abstract namespace) that carries the rings' fds at the join, then small frames both
ways:

    DATA   (key, total, offset, ring_pos, n)  src wrote bytes [offset, offset+n) of a message
                                              of ``total`` bytes at ring[ring_pos:ring_pos+n]
    CREDIT (n)                                dst copied n more bytes out of src's ring

A message larger than a chunk (ring_bytes / 4) goes as several chunks, so the writer fills one
chunk while the reader drains the previous one. Each rank runs one reader thread per peer: it
copies arriving chunks out of the ring into the message's own buffer, returns the credit at once
and files completed messages in an inbox keyed (src, key). A sender therefore never waits for
the receiver's *op*, only for its reader thread: two ranks sending to each other at once
(all-to-all) cannot deadlock.

Keys. Collectives are numbered per communicator in issue order (every rank issues the same
collectives in the same order: the Communicator contract), key ("c", n); point-to-point
messages use ("p", tag), FIFO per (src, tag).

Ops. Sends are eager: an op copies its outgoing bytes into the rings when it is issued (in the
caller's thread) and returns a Pending whose ``wait`` takes the incoming messages from the
inbox and combines them. Reductions add the ranks' contributions in rank order, so every rank
computes the same bits (for two ranks any order does).

Failures. Every wait (inbox, ring space) is bounded by the group's timeout. A peer that dies
closes its socket: the reader sees EOF and every wait on that peer fails at once with
CommunicationError. After any failure the communicator is broken (like a gloo group): every
later op raises; the worker is failed and the group formed again.

Lifecycle (``join_shm``, every rank at once, rendezvous over the group's TCPStore):
    1. every rank publishes its node identity (boot id + hostname); a mismatch fails the join
    2. every rank listens on its socket name; lower ranks accept, higher ranks connect (each
       pair once)
    3. per pair, each side creates its outgoing ring (a memfd, pages reserved: a node short of
       memory fails here, not at a later write), sends the fd over the socket (SCM_RIGHTS) and
       maps the peer's; no file exists anywhere (not under /dev/shm, whose size containers
       often cap), and the memory goes when both mappings are gone
    4. reader threads start; one all-reduce of ones checks the group
``close()`` shuts the sockets (peers see EOF), joins the reader threads and unmaps the rings.

Tensors: CPU only. Shapes as in engine/parallel.py (W = world size, N = rows).
"""

from __future__ import annotations

import datetime
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch.distributed import Store

from engine.parallel import CommunicationError, Pending, RankedCommunicator, Ready

T = TypeVar("T")

DEFAULT_RING_BYTES = 16 << 20  # per ordered pair, reserved at join
# frame: kind (D/C), key kind (c/p), key value, total, offset, ring position, n  (little endian)
_FRAME = struct.Struct("<ccqqqqq")
_DATA, _CREDIT = b"D", b"C"
Key = tuple[bytes, int]  # (b"c", collective number) or (b"p", tag)


class ShmJoinError(RuntimeError):
    """The shm group could not form (ranks on different nodes, a peer never came, /dev/shm)."""


def node_identity() -> str:
    """What two processes on the same node (same kernel boot, same host name) share."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


@dataclass
class _Peer:
    """This rank's side of one pair: the ring it writes, the ring it reads, the socket."""

    rank: int
    sock: socket.socket
    out_ring: torch.Tensor  # [ring_bytes] uint8, mapped from the file this rank writes
    in_ring: torch.Tensor  # [ring_bytes] uint8, the peer's ring for this rank
    maps: list[mmap.mmap]
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    written: int = 0  # bytes ever written into out_ring (writer side)
    credited: int = 0  # of those, bytes the peer's reader has copied out
    reader: threading.Thread | None = None

    def send_frame(self, *fields: object) -> None:
        with self.send_lock:
            self.sock.sendall(_FRAME.pack(*fields))


class _Inbound(Generic[T]):
    """A Pending over the inbox: ``finish`` turns the taken messages into the op's result."""

    def __init__(
        self, comm: ShmCommunicator, op: str, wants: list[tuple[int, Key]], finish: Callable[[list[torch.Tensor]], T]
    ):
        self._comm, self._op, self._wants, self._finish = comm, op, wants, finish
        self._done = False
        self._result: T | None = None

    def wait(self) -> T:
        if not self._done:
            deadline = time.monotonic() + self._comm.timeout_s
            parts = [self._comm._take(self._op, src, key, deadline) for src, key in self._wants]
            self._result, self._done = self._finish(parts), True
        return self._result  # type: ignore[return-value]


class ShmCommunicator(RankedCommunicator):
    """A joined shm group (``join_shm`` builds it). Thread-safety: ops may be issued from any
    thread, one at a time per the Communicator contract; reader threads fill the inbox."""

    def __init__(
        self, name: str, rank: int, world_size: int, peers: dict[int, _Peer], timeout_s: float, ring_bytes: int
    ):
        super().__init__(rank, world_size, "cpu")
        self.name = name
        self.timeout_s = timeout_s
        self.ring_bytes = ring_bytes
        self.chunk_bytes = max(4096, ring_bytes // 4)
        self._peers = peers
        self._cond = threading.Condition()  # guards inbox, partial, broken, peer.credited
        self._inbox: dict[tuple[int, Key], deque[torch.Tensor]] = {}
        self._broken: str | None = None
        self._dead: dict[int, str] = {}  # peer rank -> why its channel ended
        self._issue_lock = threading.Lock()  # collective numbering + the eager sends of one op
        self._seq = 0
        self._closing = False
        self.bytes_sent = 0  # payload bytes this rank wrote into its rings (all peers)
        for peer in peers.values():
            peer.reader = threading.Thread(
                target=self._read, args=(peer,), name=f"shm-{name}-{rank}<-{peer.rank}", daemon=True
            )
            peer.reader.start()

    def describe(self) -> str:
        return f"{self.name!r} rank {self._rank}/{self._world_size} (shm)"

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Ends the channels: peers see EOF. Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._broken = self._broken or "closed"
            self._cond.notify_all()
        for peer in self._peers.values():
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.sock.close()
        for peer in self._peers.values():
            if peer.reader is not None and peer.reader is not threading.current_thread():
                peer.reader.join(5.0)
            peer.out_ring = peer.in_ring = torch.empty(0, dtype=torch.uint8)  # drop the views before unmapping
            for m in peer.maps:
                try:
                    m.close()
                except BufferError:  # a result tensor still views the ring: the GC unmaps it later
                    pass

    # ------------------------------------------------------------------ reader thread (one per peer)
    def _read(self, peer: _Peer) -> None:
        partial: dict[Key, torch.Tensor] = {}
        try:
            while True:
                head = _recv_exact(peer.sock, _FRAME.size)
                kind, key_kind, key_val, total, offset, pos, n = _FRAME.unpack(head)
                if kind == _CREDIT:
                    with self._cond:
                        peer.credited += n
                        self._cond.notify_all()
                    continue
                key: Key = (key_kind, key_val)
                buf = partial.pop(key, None)
                if buf is None:
                    buf = torch.empty(total, dtype=torch.uint8)
                if n:
                    buf[offset : offset + n].copy_(peer.in_ring[pos : pos + n])
                if offset + n < total:
                    partial[key] = buf
                else:
                    with self._cond:
                        self._inbox.setdefault((peer.rank, key), deque()).append(buf)
                        self._cond.notify_all()
                if n:
                    try:
                        peer.send_frame(_CREDIT, b"-", 0, 0, 0, 0, n)
                    except OSError:  # the peer closed its end: it sends nothing more that needs space;
                        pass  # the frames it sent before are still read, then EOF ends this loop
        except (OSError, EOFError, ValueError) as e:
            with self._cond:
                why = "closed" if self._closing else f"channel to rank {peer.rank} ended ({type(e).__name__}: {e})"
                self._dead[peer.rank] = why
                self._cond.notify_all()

    # ------------------------------------------------------------------ sending (caller's thread)
    def _send(self, op: str, dst: int, key: Key, data: torch.Tensor) -> None:
        """Copies ``data``'s bytes into dst's ring, chunk by chunk, waiting for ring space."""
        peer = self._peers[dst]
        raw = data.contiguous().reshape(-1).view(torch.uint8)
        total, offset = raw.numel(), 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            pos = peer.written % self.ring_bytes
            want = min(total - offset, self.chunk_bytes, self.ring_bytes - pos)
            with self._cond:
                while self.ring_bytes - (peer.written - peer.credited) < want:
                    self._check_alive(op, dst, deadline)
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                self._check_alive(op, dst, deadline)
            if want:
                peer.out_ring[pos : pos + want].copy_(raw[offset : offset + want])
            peer.written += want
            try:
                peer.send_frame(_DATA, key[0], key[1], total, offset, pos, want)
            except OSError as e:
                self._fail(f"{op}: send to rank {dst} failed: {e}")
            offset += want
            if offset >= total:
                break
        self.bytes_sent += total

    def _check_alive(self, op: str, peer: int, deadline: float) -> None:
        """Under self._cond: raise if the group is broken, the peer gone or the deadline passed."""
        if self._broken is not None:
            raise CommunicationError(f"{op} on {self.describe()}: group is broken ({self._broken})")
        if peer in self._dead:
            self._broken = self._dead[peer]
            raise CommunicationError(f"{op} on {self.describe()}: {self._dead[peer]}")
        if time.monotonic() >= deadline:
            self._broken = f"{op} timed out after {self.timeout_s} s waiting for rank {peer}"
            self._cond.notify_all()
            raise CommunicationError(f"{op} on {self.describe()}: {self._broken}")

    def _fail(self, why: str) -> None:
        with self._cond:
            self._broken = self._broken or why
            self._cond.notify_all()
        raise CommunicationError(f"{self.describe()}: {why}")

    # ------------------------------------------------------------------ receiving (waiter's thread)
    def _take(self, op: str, src: int, key: Key, deadline: float) -> torch.Tensor:
        with self._cond:
            while True:
                q = self._inbox.get((src, key))
                if q:
                    msg = q.popleft()
                    if not q:
                        del self._inbox[(src, key)]
                    return msg
                self._check_alive(op, src, deadline)
                self._cond.wait(max(0.0, deadline - time.monotonic()))

    def _collective(
        self, op: str, outgoing: Callable[[int], torch.Tensor], finish: Callable[[list[torch.Tensor]], T]
    ) -> Pending[T]:
        """Sends ``outgoing(p)`` to every peer p now; the Pending takes one message from every
        peer (in rank order, this rank's own slot None-free: ``finish`` gets W-1 tensors in
        rank order of the peers)."""
        with self._issue_lock:
            with self._cond:
                if self._broken is not None:
                    raise CommunicationError(f"{op} on {self.describe()}: group is broken ({self._broken})")
            key: Key = (b"c", self._seq)
            self._seq += 1
            for p in self._others():
                self._send(op, p, key, outgoing(p))
        return _Inbound(self, op, [(p, key) for p in self._others()], finish)

    def _others(self) -> list[int]:
        return [p for p in range(self._world_size) if p != self._rank]

    def _with_own(self, parts: list[torch.Tensor], own: torch.Tensor) -> list[torch.Tensor]:
        """The peers' parts (rank order, without this rank) with ``own`` at this rank's place."""
        return [*parts[: self._rank], own, *parts[self._rank :]]

    # ------------------------------------------------------------------ the ops
    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        x = x.contiguous()
        if self._world_size == 1:
            return Ready(x)

        def finish(parts: list[torch.Tensor]) -> torch.Tensor:
            terms = self._with_own([_typed(p, x.dtype, x.shape) for p in parts], x)
            acc = terms[0] + terms[1]  # rank order: every rank adds the same terms the same way
            for t in terms[2:]:
                acc += t
            return x.copy_(acc)

        return self._collective("all_reduce", lambda p: x, finish)

    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        x = x.contiguous()
        chunks = x.chunk(self._world_size)  # [N / W, ...] each
        own = chunks[self._rank]
        if self._world_size == 1:
            return Ready(own.clone())

        def finish(parts: list[torch.Tensor]) -> torch.Tensor:
            terms = self._with_own([_typed(p, x.dtype, own.shape) for p in parts], own)
            acc = terms[0] + terms[1]
            for t in terms[2:]:
                acc += t
            return acc

        return self._collective("reduce_scatter", lambda p: chunks[p], finish)

    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        x = x.contiguous()

        def finish(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(self._with_own([_typed(p, x.dtype, x.shape) for p in parts], x))

        if self._world_size == 1:
            return Ready(x.clone())
        return self._collective("all_gather", lambda p: x, finish)

    def _start_all_to_all(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Pending[torch.Tensor]:
        x = x.contiguous()
        rows = list(x.split(send_splits))
        tail = x.shape[1:]

        def finish(parts: list[torch.Tensor]) -> torch.Tensor:
            peers = self._others()
            got = [_typed(part, x.dtype, (recv_splits[p], *tail)) for part, p in zip(parts, peers, strict=True)]
            return torch.cat(self._with_own(got, rows[self._rank]))

        if self._world_size == 1:
            return Ready(rows[0].clone())
        return self._collective("all_to_all", lambda p: rows[p], finish)

    def _start_send(self, x: torch.Tensor, dst: int, tag: int) -> Pending[None]:
        with self._issue_lock:
            with self._cond:
                if self._broken is not None:
                    raise CommunicationError(f"send on {self.describe()}: group is broken ({self._broken})")
            self._send(f"send to {dst}", dst, (b"p", tag), x)
        return Ready(None)

    def _start_recv(self, out: torch.Tensor, src: int, tag: int) -> Pending[torch.Tensor]:
        def finish(parts: list[torch.Tensor]) -> torch.Tensor:
            (raw,) = parts
            want = out.numel() * out.element_size()
            if raw.numel() != want:
                self._fail(f"recv from {src} tag {tag}: got {raw.numel()} bytes, out holds {want}")
            if want:
                out.view(-1).view(torch.uint8).copy_(raw)
            return out

        return _Inbound(self, f"recv from {src}", [(src, (b"p", tag))], finish)


def _typed(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A received message's bytes as ``dtype`` of ``shape`` (a view; raises if the size is off)."""
    n = 1
    for s in shape:
        n *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if raw.numel() != n * itemsize:
        raise CommunicationError(f"message of {raw.numel()} bytes, expected {n * itemsize} ({dtype}, {tuple(shape)})")
    return raw.view(dtype).view(shape)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    got = sock.recv(n, socket.MSG_WAITALL)  # blocks until n bytes, EOF or an error
    if len(got) < n:
        raise EOFError("peer closed the channel")
    return got


# ============================================================================ joining


def join_shm(
    name: str, rank: int, world_size: int, store: Store, timeout_s: float, ring_bytes: int = DEFAULT_RING_BYTES
) -> ShmCommunicator:
    """Join the shm group ``name`` as ``rank`` (module docstring, Lifecycle). ``store``: a store
    every rank shares (a PrefixStore of the group's TCPStore). Raises ShmJoinError."""
    deadline = time.monotonic() + timeout_s
    wait = datetime.timedelta(seconds=timeout_s)
    store.set(f"node/{rank}", node_identity())
    if rank == 0:
        store.set("token", secrets.token_hex(6))
    store.wait(["token", *(f"node/{r}" for r in range(world_size))], wait)
    nodes = {r: store.get(f"node/{r}").decode() for r in range(world_size)}
    if len(set(nodes.values())) != 1:
        raise ShmJoinError(f"shm group {name!r} needs every rank on one node, got {nodes}")
    token = store.get("token").decode()

    def sock_name(r: int) -> str:
        return f"\0splitserve-{token}-{r}"  # abstract namespace: no file to clean up

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socks: dict[int, socket.socket] = {}
    peers: dict[int, _Peer] = {}
    try:
        listener.bind(sock_name(rank))
        listener.listen(world_size)
        store.set(f"ready/{rank}", "1")
        store.wait([f"ready/{r}" for r in range(world_size)], wait)
        for p in range(rank):  # connect to every lower rank, announce this one
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(sock_name(p))
            s.sendall(struct.pack("<q", rank))
            socks[p] = s
        listener.settimeout(max(0.1, deadline - time.monotonic()))
        for _ in range(rank + 1, world_size):  # accept every higher rank
            s, _addr = listener.accept()
            s.settimeout(max(0.1, deadline - time.monotonic()))
            (p,) = struct.unpack("<q", _recv_exact(s, 8))
            socks[p] = s
        for p, s in sorted(socks.items()):  # each side sends its ring's memfd, then maps the peer's
            out_ring, out_map, fd = _new_ring(f"splitserve-{name}-{rank}-{p}", ring_bytes)
            try:
                socket.send_fds(s, [b"R"], [fd])
            finally:
                os.close(fd)  # the mapping (and the peer's, once it received it) keeps the memory
            _msg, fds, _flags, _addr = socket.recv_fds(s, 1, 1)
            if len(fds) != 1:
                raise ShmJoinError(f"shm group {name!r}: rank {p} sent no ring")
            in_ring, in_map = _map_fd(fds[0], ring_bytes)
            s.settimeout(None)  # the reader blocks until a frame or EOF
            peers[p] = _Peer(p, s, out_ring, in_ring, [out_map, in_map])
    except ShmJoinError:
        for s in socks.values():
            s.close()
        raise
    except Exception as e:  # noqa: BLE001 - store, socket and mapping errors all mean "could not join"
        for s in socks.values():
            s.close()
        raise ShmJoinError(
            f"shm group {name!r} rank {rank}/{world_size} could not join: {type(e).__name__}: {e}"
        ) from e
    finally:
        listener.close()
    comm = ShmCommunicator(name, rank, world_size, peers, timeout_s, ring_bytes)
    ones = comm.all_reduce(torch.ones(1, dtype=torch.int64))
    if int(ones.item()) != world_size:
        comm.close()
        raise ShmJoinError(f"shm group {name!r}: {int(ones.item())} ranks joined, expected {world_size}")
    return comm


def _new_ring(name: str, size: int) -> tuple[torch.Tensor, mmap.mmap, int]:
    """A ring in a fresh memfd: [size] uint8 view, its mapping and the fd (the caller closes it).
    The pages are reserved now, so a node short of memory fails the join, not a later write."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        view, m = _map_fd(fd, size, close=False)
    except BaseException:
        os.close(fd)
        raise
    return view, m, fd


def _map_fd(fd: int, size: int, close: bool = True) -> tuple[torch.Tensor, mmap.mmap]:
    """[size] uint8 view of a shared mapping of ``fd`` (closed after mapping when ``close``)."""
    try:
        if os.fstat(fd).st_size < size:
            raise ShmJoinError(f"ring of {os.fstat(fd).st_size} bytes, expected {size}")
        m = mmap.mmap(fd, size)
    finally:
        if close:
            os.close(fd)
    return torch.frombuffer(m, dtype=torch.uint8, count=size), m
