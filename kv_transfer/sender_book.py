"""Sender-side bookkeeping shared by every transport.

``SenderBook`` tracks each request's sender status (BOOTSTRAPPING -> TRANSFERRING -> DONE |
FAILED). ``BookedSender`` implements the transport-independent half of KVSender: argument
validation, the non-blocking ``send``/``finish`` (a FIFO drained by one background thread,
so the compute thread never waits on the link), sealing chunks (checksum, test fault hook)
and link-failure handling. A transport implements ``connect`` (calling ``_start`` once its
handshake succeeded), ``_transmit_chunk``, ``_transmit_finish`` and ``_disconnect``, and may
override ``_transmit_pages`` (seal + transmit); the transmit hooks run on the worker thread
only, in ``send`` order. A transport with a by-reference path overrides ``send_blocks``
(validate with ``_check_chunk``, checksum the pages in place, ``_queue_blocks``) and
implements ``_transmit_blocks``; if it settles DONE itself (``_acks_finish``), it must do so
only once nothing on this side is still needed by the receiver.

A transmit exception means the link is broken: every unfinished request FAILS and later
``send`` calls raise KVTransferError.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections import deque
from dataclasses import dataclass

import torch

from engine.kv_cache.layout import KVLayout
from kv_transfer.base import FaultHook, KVChunk, KVLinkBroken, KVSender, KVTransferError, TransferStatus

_MAX_TERMINAL = 4096  # DONE/FAILED entries kept for poll() before the oldest are forgotten


@dataclass
class _Outgoing:
    status: TransferStatus = TransferStatus.BOOTSTRAPPING
    submitted: int = 0  # send() calls so far
    finished: bool = False  # finish() called
    error: str | None = None


class SenderBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reqs: dict[str, _Outgoing] = {}
        self._terminal: deque[str] = deque()
        self.broken: str | None = None  # why the link is unusable, once it is

    def add_chunk(self, rid: str) -> None:
        with self._lock:
            if self.broken is not None:
                raise KVLinkBroken(f"link is broken: {self.broken}")
            req = self._reqs.setdefault(rid, _Outgoing())
            if req.finished:
                raise KVTransferError(f"send() for request {rid!r} after its finish()")
            req.submitted += 1

    def add_finish(self, rid: str, num_chunks: int) -> None:
        with self._lock:
            if self.broken is not None:
                raise KVLinkBroken(f"link is broken: {self.broken}")
            req = self._reqs.setdefault(rid, _Outgoing())
            if req.finished:
                raise KVTransferError(f"finish() called twice for request {rid!r}")
            if num_chunks != req.submitted:
                raise KVTransferError(f"finish({rid!r}, num_chunks={num_chunks}) but {req.submitted} chunks were sent")
            req.finished = True

    def transmitted(self, rid: str) -> None:
        with self._lock:
            req = self._reqs.get(rid)
            if req is not None and req.status is TransferStatus.BOOTSTRAPPING:
                req.status = TransferStatus.TRANSFERRING

    def done(self, rid: str) -> None:
        self._settle(rid, TransferStatus.DONE, None)

    def fail(self, rid: str, why: str) -> None:
        self._settle(rid, TransferStatus.FAILED, f"request {rid!r}: {why}")

    def fail_all(self, why: str) -> None:
        """The link broke: fail every request not yet settled; refuse new work."""
        with self._lock:
            self.broken = why
            pending = [rid for rid, req in self._reqs.items() if not req.status.terminal]
        for rid in pending:
            self.fail(rid, f"link broken: {why}")

    def poll(self, rid: str) -> TransferStatus:
        with self._lock:
            return self._get(rid).status

    def error(self, rid: str) -> str | None:
        with self._lock:
            return self._get(rid).error

    def _get(self, rid: str) -> _Outgoing:
        req = self._reqs.get(rid)
        if req is None:
            raise KeyError(f"request {rid!r} is unknown to this sender")
        return req

    def _settle(self, rid: str, status: TransferStatus, error: str | None) -> None:
        with self._lock:
            req = self._reqs.get(rid)
            if req is None or req.status.terminal:
                return
            req.status, req.error = status, error
            self._terminal.append(rid)
            while len(self._terminal) > _MAX_TERMINAL:
                old = self._terminal.popleft()
                if old in self._reqs and self._reqs[old].status.terminal:
                    del self._reqs[old]


class BookedSender(KVSender):
    """KVSender with a background worker thread; see the module docstring."""

    # True when the transport settles DONE itself (from a receiver acknowledgement)
    _acks_finish = False

    def __init__(self, layout: KVLayout, *, fault_hook: FaultHook | None = None):
        super().__init__(layout)
        self.book = SenderBook()
        self.fault_hook = fault_hook
        self.max_chunk_bytes: int | None = None  # transport limit, set during connect
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API
    def send(self, request_id: str, layer: int, first_page: int, pages: torch.Tensor) -> None:
        self._check_chunk(layer, first_page)
        if pages.dim() != 5 or pages.shape[0] < 1 or tuple(pages.shape[1:]) != self.layout.page_shape:
            raise ValueError(
                f"pages must be [n>=1, {', '.join(map(str, self.layout.page_shape))}], got {list(pages.shape)}"
            )
        if pages.dtype != self.layout.torch_dtype:
            raise ValueError(f"pages dtype {pages.dtype} != layout dtype {self.layout.torch_dtype}")
        nbytes = pages.shape[0] * self.layout.page_bytes
        if self.max_chunk_bytes is not None and nbytes > self.max_chunk_bytes:
            raise ValueError(
                f"chunk of {nbytes} bytes exceeds this transport's {self.max_chunk_bytes}-byte limit; send fewer pages per chunk"
            )
        self.book.add_chunk(request_id)
        self._queue.put(("chunk", request_id, layer, first_page, pages))

    def _check_chunk(self, layer: int, first_page: int) -> None:
        self._check_open()
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.layout.num_layers})")
        if first_page < 0:
            raise ValueError(f"first_page must be >= 0, got {first_page}")

    def _queue_blocks(self, request_id: str, *args) -> None:
        """Queue a by-reference chunk (validated by the caller); ``_transmit_blocks(request_id,
        *args)`` puts it on the wire, in ``send`` order with everything else."""
        self.book.add_chunk(request_id)
        self._queue.put(("blocks", request_id, *args))

    def finish(self, request_id: str, num_chunks: int) -> None:
        self._check_open()
        self.book.add_finish(request_id, num_chunks)
        self._queue.put(("finish", request_id, num_chunks))

    def poll(self, request_id: str) -> TransferStatus:
        return self.book.poll(request_id)

    @property
    def link_error(self) -> str | None:
        return self.book.broken

    def error(self, request_id: str) -> str | None:
        return self.book.error(request_id)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)  # processed after everything already queued
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.book.fail_all(f"close(): queued chunks not transmitted within {timeout}s")
        self._disconnect()

    # ------------------------------------------------------------ transport hooks
    @abc.abstractmethod
    def _transmit_chunk(self, chunk: KVChunk) -> None:
        """Put one sealed chunk on the wire (may block). Worker thread only."""

    def _transmit_pages(self, rid: str, layer: int, first_page: int, pages: torch.Tensor) -> None:
        """Seal (checksum, fault hook) and transmit one chunk. Worker thread only. A transport
        may override this to compute the checksum while it copies the pages out (shm), as
        long as every byte is hashed from ``pages`` before it moves and the fault hook, when
        set, still sees the sealed chunk."""
        self._transmit_chunk(self._seal(rid, layer, first_page, pages))

    def _transmit_blocks(self, request_id: str, *args) -> None:
        """Put one by-reference chunk queued by ``_queue_blocks`` on the wire. Worker thread only."""
        raise NotImplementedError(f"{type(self).__name__} queued a by-reference chunk it cannot transmit")

    @abc.abstractmethod
    def _transmit_finish(self, request_id: str, num_chunks: int) -> None:
        """Put the end-of-stream marker on the wire. Worker thread only."""

    @abc.abstractmethod
    def _disconnect(self) -> None:
        """Release the link. Called once by close(), after the worker stopped (or timed out)."""

    def _start(self, name: str) -> None:
        """Called by connect() once the handshake succeeded: start the worker thread."""
        if self._thread is not None:
            raise KVTransferError("connect() called twice")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------- worker
    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError("sender is closed")
        if self._thread is None:
            raise KVTransferError("sender is not connected; call connect(receiver.address) first")

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, rid, *args = item
            if self.book.broken is not None:
                self.book.fail(rid, f"link broken: {self.book.broken}")
                continue
            try:
                if kind == "chunk":
                    self._transmit_pages(rid, *args)
                    self.book.transmitted(rid)
                elif kind == "blocks":
                    self._transmit_blocks(rid, *args)
                    self.book.transmitted(rid)
                else:
                    self._transmit_finish(rid, *args)
                    if not self._acks_finish:
                        self.book.done(rid)
            except Exception as e:  # noqa: BLE001 - any transmit error breaks the link
                self.book.fail_all(f"{type(e).__name__}: {e}")

    def _seal(self, rid: str, layer: int, first_page: int, pages: torch.Tensor) -> KVChunk:
        chunk = KVChunk.seal(rid, layer, first_page, pages)
        return self.fault_hook(chunk) if self.fault_hook is not None else chunk
