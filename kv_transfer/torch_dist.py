"""torch.distributed point-to-point transport (gloo for CPU caches, NCCL for CUDA caches).

No global ``init_process_group``: every sender/receiver pair gets its own 2-rank process
groups (rank 0 = sender, rank 1 = receiver), joined with ``engine.runtime.groups.join_group``
over the receiver's TCPStore (the store the handshake below already uses), so one process
can hold any number of pairs.

Rendezvous (the receiver hosts the TCPStore; its ``address`` is ``(host, port)``)::

    sender                                      receiver accept thread
    k = add("kv/pairs", 1) - 1
    set kv/{k}/hello = {layout}          ─────>  wait kv/{k}/hello, compare layouts
                                         <─────  set kv/{k}/reply = {ok, layout, backend}
    set kv/{k}/go; build groups(rank 0)  ─────>  wait kv/{k}/go; build groups(rank 1)

Per pair, ``ctl`` (always gloo) carries fixed-size headers (tag 0) and ``data`` (gloo, or
NCCL when the receiver's cache is on CUDA) carries payloads (tag 1), in the same order::

    header {"t":"c", rid, layer, first, n, nbytes, crc}  then  payload: [nbytes] uint8
    header {"t":"f", rid, n}    header {"t":"bye"}

Gloo ops time out by closing the pair, and an idle link is normal, so groups are built
with a long timeout. A receive blocked on an idle pair cannot be interrupted (gloo has no
abort for a pending recv): after ``close()`` such a thread ends when the sender says bye or
exits, and it never writes into the cache once closed.

Checksums (``tensor_checksum``, xxh3) are over host bytes, so the NCCL path pays a device-to-host copy per
chunk on each side (NCCL path untested here: it needs two GPUs).
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import TCPStore

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from engine.parallel import ProcessGroup
from engine.runtime.groups import GroupBackend, GroupSpec, join_group
from kv_transfer.base import FaultHook, KVChunk, KVTransferError, PageSink, check_layouts, tensor_bytes
from kv_transfer.receiver_book import BookedReceiver
from kv_transfer.sender_book import BookedSender

_HEADER_BYTES = 1024
_IDLE = datetime.timedelta(days=30)  # group timeout: idle links must never time out
_TAG_CTL, _TAG_DATA = 0, 1
SENDER, RECEIVER = 0, 1


def _encode(msg: dict) -> torch.Tensor:
    data = json.dumps(msg).encode()
    if len(data) > _HEADER_BYTES - 4:
        raise KVTransferError(f"header too long ({len(data)} bytes): request id too long?")
    out = torch.zeros(_HEADER_BYTES, dtype=torch.uint8)
    out[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    out[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _decode(header: torch.Tensor) -> dict:
    raw = header.numpy().tobytes()
    return json.loads(raw[4 : 4 + int.from_bytes(raw[:4], "little")])


def _build_groups(
    store: TCPStore, address: tuple[str, int], k: int, rank: int, backend: GroupBackend, device: torch.device
) -> tuple[ProcessGroup, ProcessGroup]:
    """Pair k's groups over the receiver's store at ``address``: ``ctl`` (gloo) and ``data``
    (``ctl`` itself for gloo; NCCL on ``device``, the side's CUDA device, otherwise)."""

    def spec(part: str, part_backend: GroupBackend) -> GroupSpec:
        host, port = address
        return GroupSpec(f"kv/{k}/{part}", rank, 2, host, port, part_backend, _IDLE.total_seconds())

    ctl = join_group(spec("ctl", "gloo"), store)
    if backend == "gloo":
        return ctl, ctl
    with torch.cuda.device(device):
        return ctl, join_group(spec("data", "nccl"), store)


class TorchDistReceiver(BookedReceiver):
    def __init__(
        self,
        layout: KVLayout,
        cache: PagedKVCache | PageSink,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "auto",
        connect_timeout_s: float = 60.0,
        max_unexpected_bytes: int = 64 << 20,
    ):
        super().__init__(layout, cache, max_unexpected_bytes)
        if backend == "auto":
            backend = "nccl" if cache.kv.is_cuda else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and not (cache.kv.is_cuda and dist.is_nccl_available()):
            raise ValueError("backend 'nccl' needs a CUDA cache and a torch build with NCCL")
        self.backend = backend
        self._timeout = datetime.timedelta(seconds=connect_timeout_s)
        self._master = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=self._timeout)
        self._host, self._port = host, self._master.port
        self._closed = False
        self._next_k = 0
        self._pairs: list[threading.Thread] = []
        threading.Thread(target=self._accept_loop, name="kv-torch-accept", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return (self._host, self._port)

    def close(self, timeout_s: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:  # wake the accept loop, which waits on the next pair's hello key
            self._client().set(f"kv/{self._next_k}/hello", json.dumps({"closing": True}))
        except Exception:  # noqa: BLE001 - store already gone: the loop is not waiting
            pass
        # let pairs whose sender already said bye tear their groups down before we return;
        # a pair idle in recv stays blocked (see the module docstring)
        deadline = time.monotonic() + timeout_s
        for t in self._pairs:
            t.join(max(0.0, deadline - time.monotonic()))

    def _client(self) -> TCPStore:
        # one client per thread: a blocking wait would stall other users of a shared client
        return TCPStore(self._host, self._port, is_master=False, timeout=self._timeout)

    def _accept_loop(self) -> None:
        store = self._client()
        while not self._closed:
            key = f"kv/{self._next_k}/hello"
            try:
                store.wait([key], _IDLE)
            except Exception:  # noqa: BLE001 - a store wait timing out after 30 idle days
                continue
            hello = json.loads(store.get(key))
            if self._closed or "layout" not in hello:
                return
            k, self._next_k = self._next_k, self._next_k + 1
            t = threading.Thread(target=self._serve_pair, args=(k, hello), name=f"kv-torch-recv-{k}", daemon=True)
            self._pairs = [p for p in self._pairs if p.is_alive()] + [t]
            t.start()

    def _serve_pair(self, k: int, hello: dict) -> None:
        store = self._client()
        reply = {"ok": True, "layout": self.layout.to_dict(), "backend": self.backend}
        try:
            check_layouts(
                self.layout, KVLayout.from_dict(hello["layout"]), "torch.distributed receiver refused the sender"
            )
        except KVLayoutMismatch as e:
            reply |= {"ok": False, "error": str(e)}
        store.set(f"kv/{k}/reply", json.dumps(reply))
        if not reply["ok"]:
            return
        open_rids: set[str] = set()  # requests with chunks seen but no finish yet
        try:
            store.wait([f"kv/{k}/go"], self._timeout)
            ctl, data = _build_groups(store, self.address, k, RECEIVER, self.backend, self.cache.kv.device)
            self._receive(ctl, data, open_rids)
            why = "sender closed the connection without finishing"
        except Exception as e:  # noqa: BLE001 - any transport error ends this pair
            why = "receiver closed" if self._closed else f"{type(e).__name__}: {e}"
        if open_rids:
            self.book.on_stream_error(open_rids, why)

    def _receive(self, ctl: Any, data: Any, open_rids: set[str]) -> None:
        device = self.cache.kv.device if self.backend == "nccl" else torch.device("cpu")
        while True:
            header = torch.empty(_HEADER_BYTES, dtype=torch.uint8)
            ctl.recv([header], SENDER, _TAG_CTL).wait()
            m = _decode(header)
            if m["t"] == "c":
                payload = torch.empty(m["nbytes"], dtype=torch.uint8, device=device)
                if m["nbytes"] > 0:
                    data.recv([payload], SENDER, _TAG_DATA).wait()
                if self._closed:
                    continue
                open_rids.add(m["rid"])
                self.book.on_chunk(KVChunk(m["rid"], m["layer"], m["first"], m["n"], payload, m["crc"]))
            elif m["t"] == "f":
                open_rids.discard(m["rid"])
                if not self._closed:
                    self.book.on_finish(m["rid"], m["n"])
            elif m["t"] == "bye":
                return
            else:
                raise KVTransferError(f"unknown header type {m['t']!r}")


class TorchDistSender(BookedSender):
    def __init__(self, layout: KVLayout, *, fault_hook: FaultHook | None = None, connect_timeout_s: float = 60.0):
        super().__init__(layout, fault_hook=fault_hook)
        self._timeout = datetime.timedelta(seconds=connect_timeout_s)
        self._store: TCPStore | None = None
        self._ctl: Any = None
        self._data: Any = None
        self._backend = "gloo"

    def connect(self, peer: tuple[str, int]) -> None:
        host, port = peer
        store = TCPStore(host, int(port), is_master=False, timeout=self._timeout)
        k = store.add("kv/pairs", 1) - 1
        store.set(f"kv/{k}/hello", json.dumps({"layout": self.layout.to_dict()}))
        store.wait([f"kv/{k}/reply"], self._timeout)
        reply = json.loads(store.get(f"kv/{k}/reply"))
        check_layouts(self.layout, KVLayout.from_dict(reply["layout"]), f"torch.distributed receiver at {host}:{port}")
        if not reply["ok"]:
            raise KVTransferError(f"torch.distributed receiver at {host}:{port} refused: {reply['error']}")
        self._backend = reply["backend"]
        store.set(f"kv/{k}/go", "1")
        device = torch.device("cuda", torch.cuda.current_device()) if self._backend == "nccl" else torch.device("cpu")
        self._ctl, self._data = _build_groups(store, (host, int(port)), k, SENDER, self._backend, device)
        self._store = store
        self._start(f"kv-torch-send->{host}:{port}/{k}")

    def _transmit_chunk(self, chunk: KVChunk) -> None:
        if self._backend == "nccl":
            payload = chunk.payload.detach().cuda().contiguous().reshape(-1).view(torch.uint8)
        else:
            payload = tensor_bytes(chunk.payload)  # [nbytes] uint8, CPU
        header = {
            "t": "c",
            "rid": chunk.request_id,
            "layer": chunk.layer,
            "first": chunk.first_page,
            "n": chunk.num_pages,
        }
        self._ctl.send(
            [_encode(header | {"nbytes": payload.numel(), "crc": chunk.checksum})], RECEIVER, _TAG_CTL
        ).wait()
        if payload.numel() > 0:
            self._data.send([payload], RECEIVER, _TAG_DATA).wait()

    def _transmit_finish(self, request_id: str, num_chunks: int) -> None:
        self._ctl.send([_encode({"t": "f", "rid": request_id, "n": num_chunks})], RECEIVER, _TAG_CTL).wait()

    def _disconnect(self) -> None:
        worker_idle = self._thread is None or not self._thread.is_alive()
        if self._ctl is not None and worker_idle and self.book.broken is None:
            try:
                self._ctl.send([_encode({"t": "bye"})], RECEIVER, _TAG_CTL).wait()
            except RuntimeError:
                pass  # receiver already gone
        self._ctl = self._data = self._store = None
