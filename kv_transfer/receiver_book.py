"""Receiver-side bookkeeping shared by every transport.

``ReceiverBook`` owns the per-request state machine described in ``kv_transfer.base``:
pending requests, chunk counting, size and checksum verification, the page-coverage check,
writing verified pages into the PagedKVCache (a CPU cache directly, one memcpy per run of
consecutive blocks, see ``bytes_ops.PageScatter``; any other cache, or a ``PageSink`` such as
a tensor-parallel worker's head-splitting one, through ``write_pages``),
buffering of chunks that arrive before ``expect``, cancellation tombstones. A transport
only decodes its wire format into ``on_chunk`` / ``on_finish`` / ``on_stream_error`` calls;
``BookedReceiver`` implements the transport-independent half of the KVReceiver ABC on top
of one book. ``on_shared_pages`` is the one-copy entry (shm with a shared sender cache):
the pages are copied from the sender's mapped cache straight into the reserved blocks and
verified as they land, under the lock.

Thread safety: transports call the ``on_*`` methods from their receive threads while the
decode worker calls ``expect`` / ``poll`` / ``cancel``. Checksums of ``on_chunk`` payloads
are computed outside the lock (``on_shared_pages`` hashes as it copies, under it); state
changes and cache writes happen under it, so once ``cancel`` returns no byte of a late
chunk can land in blocks that may already belong to another request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import KVChunk, KVReceiver, KVTransferError, PageSink, TransferStatus, tensor_checksum
from kv_transfer.bytes_ops import PageScatter, tensor_bytes

_MAX_TERMINAL = 4096  # DONE/FAILED entries kept for poll() before the oldest are forgotten
_MAX_TOMBSTONES = 65536  # cancelled / forgotten request ids whose late chunks are dropped


@dataclass
class _Request:
    block_ids: list[int]
    written: np.ndarray  # [num_layers, len(block_ids)] bool: page written for that layer
    status: TransferStatus = TransferStatus.BOOTSTRAPPING
    received: int = 0  # chunks verified and written
    promised: int | None = None  # num_chunks from the sender's finish
    error: str | None = None


@dataclass
class _Early:
    """Events for a request not yet expected, replayed in arrival order by ``expect``."""

    events: list[KVChunk | int] = field(default_factory=list)  # chunk, or finish's num_chunks
    nbytes: int = 0


class ReceiverBook:
    def __init__(
        self,
        layout: KVLayout,
        cache: PagedKVCache | PageSink,
        max_unexpected_bytes: int = 64 << 20,
        on_terminal: Callable[[], None] | None = None,
    ):
        self.on_terminal = on_terminal  # called when a request becomes DONE or FAILED (lock held)
        self.layout = layout
        self.cache = cache
        self.max_unexpected_bytes = max_unexpected_bytes
        self._lock = threading.Lock()
        self._reqs: dict[str, _Request] = {}
        self._early: dict[str, _Early] = {}
        self._early_bytes = 0
        self._doomed: OrderedDict[str, str] = OrderedDict()  # not yet expected, already failed
        # cancelled ids -> whether the transfer was DONE when cancelled (the decode worker
        # cancels a request's bookkeeping once it has admitted it: that is no failure)
        self._tombstones: OrderedDict[str, bool] = OrderedDict()
        self._terminal: deque[str] = deque()
        self.bytes_received = 0  # page bytes verified and written into the cache (metrics, tests)
        # a PagedKVCache on the CPU: memcpy straight into it; any other sink (a tensor-parallel
        # worker's, which splits pages by head: decode_worker/tp_kv_receiver.py) gets write_pages
        self._scatter = PageScatter(cache) if isinstance(cache, PagedKVCache) and PageScatter.supports(cache) else None

    # ------------------------------------------------------------------ decode-worker side
    def expect(self, request_id: str, block_ids: list[int]) -> None:
        ids = [int(b) for b in block_ids]
        if not ids:
            raise ValueError(f"expect({request_id!r}): no destination blocks")
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.cache.num_blocks:
            raise ValueError(f"expect({request_id!r}): block ids must be unique and in [0, {self.cache.num_blocks})")
        with self._lock:
            if request_id in self._reqs:
                raise KVTransferError(f"request {request_id!r} is already expected; cancel() it first")
            self._tombstones.pop(request_id, None)
            req = _Request(ids, np.zeros((self.layout.num_layers, len(ids)), dtype=bool))
            self._reqs[request_id] = req
            doom = self._doomed.pop(request_id, None)
            if doom is not None:
                self._fail(request_id, req, doom)
            early = self._drop_early(request_id)
            if early is not None:
                for ev in early.events:
                    if isinstance(ev, KVChunk):
                        self._apply_chunk(request_id, req, ev, self._verify(ev))
                    else:
                        self._apply_finish(request_id, req, ev)

    def poll(self, request_id: str) -> TransferStatus:
        with self._lock:
            return self._get(request_id).status

    def error(self, request_id: str) -> str | None:
        with self._lock:
            return self._get(request_id).error

    def cancel(self, request_id: str) -> None:
        with self._lock:
            req = self._reqs.pop(request_id, None)
            self._drop_early(request_id)
            self._doomed.pop(request_id, None)
            self._tombstone(request_id, done=req is not None and req.status is TransferStatus.DONE)

    # ------------------------------------------------------------------- transport side
    def on_chunk(self, chunk: KVChunk) -> None:
        """Verify and write one chunk. ``chunk.payload`` may be borrowed (e.g. a view of a
        shared-memory arena): it is only read during this call, copied if buffered."""
        problem = self._verify(chunk)  # outside the lock: hashing is the expensive part
        with self._lock:
            rid = chunk.request_id
            if rid in self._tombstones or rid in self._doomed:
                return
            req = self._reqs.get(rid)
            if req is None:
                self._buffer(rid, chunk)
            else:
                self._apply_chunk(rid, req, chunk, problem)

    def on_shared_pages(
        self, rid: str, layer: int, first_page: int, src: np.ndarray, src_ids: list[int], checksum: int
    ) -> None:
        """A chunk still in the sender's memory: pages ``src[src_ids]`` (``src: [Ns,
        page_bytes]`` uint8 rows of one layer of a mapped sender cache; the transport has
        checked ``src_ids`` are in range and ``layer`` < num_layers). Copied straight into
        the reserved blocks with the checksum taken from the bytes that landed (one copy);
        on a mismatch the request FAILS (its own blocks may hold the bad bytes). Before
        ``expect`` the pages are gathered into the early buffer. ``src`` is only read
        during this call."""
        n = len(src_ids)
        with self._lock:  # held across the copy: once cancel() returns nothing lands
            if rid in self._tombstones or rid in self._doomed:
                return
            req = self._reqs.get(rid)
            if req is None and not self._room_for(rid, n * self.layout.page_bytes):
                return
            if req is None or self._scatter is None:  # no destination yet, or not a CPU cache
                gathered = torch.from_numpy(src[src_ids]).reshape(-1)  # fancy index: an owned copy
                chunk = KVChunk(rid, layer, first_page, n, gathered, checksum)
                if req is None:
                    self._buffer(rid, chunk, owned=True)
                else:
                    self._apply_chunk(rid, req, chunk, self._verify(chunk))
                return
            if req.status is TransferStatus.FAILED:
                return
            problem = "chunk arrived after the request was DONE" if req.status is TransferStatus.DONE else None
            problem = problem or self._range_problem(req, layer, first_page, n)
            if problem is None:
                got = self._scatter.copy_pages(layer, req.block_ids[first_page : first_page + n], src, src_ids)
                if got != checksum:
                    problem = f"checksum mismatch (layer {layer}, first_page {first_page}, copied from the sender's cache): got {got:#010x}, sender said {checksum:#010x}"
            if problem is not None:
                self._fail(rid, req, problem)
                return
            self._landed(rid, req, layer, first_page, n)

    def on_bad_chunk(self, rid: str, why: str) -> None:
        """The transport could not decode a chunk of ``rid`` (e.g. block ids out of range):
        fail the request (or doom it until ``expect``); other requests are unaffected."""
        with self._lock:
            if rid in self._tombstones or rid in self._doomed:
                return
            req = self._reqs.get(rid)
            if req is None:
                self._doom(rid, f"bad chunk before the request was expected: {why}")
            elif not req.status.terminal:
                self._fail(rid, req, f"bad chunk: {why}")

    def on_finish(self, request_id: str, num_chunks: int) -> None:
        with self._lock:
            if request_id in self._tombstones or request_id in self._doomed:
                return
            req = self._reqs.get(request_id)
            if req is None:
                self._early.setdefault(request_id, _Early()).events.append(num_chunks)
            else:
                self._apply_finish(request_id, req, num_chunks)

    def on_stream_error(self, request_ids: set[str], why: str) -> None:
        """The stream carrying these requests broke (link lost, protocol violation) before
        their finish: fail them."""
        with self._lock:
            for rid in request_ids:
                if rid in self._tombstones:
                    continue
                req = self._reqs.get(rid)
                if req is None:
                    self._doom(rid, f"transfer stream broke before the request was expected: {why}")
                elif not req.status.terminal:
                    self._fail(rid, req, f"transfer stream broke: {why}")

    def status_for_ack(self, request_id: str) -> tuple[bool, str]:
        """(ok, message) summarising the request for a sender-facing acknowledgement."""
        with self._lock:
            if request_id in self._tombstones:
                if self._tombstones[request_id]:  # admitted, then forgotten: a completed transfer
                    return True, TransferStatus.DONE.value
                return False, f"request {request_id!r} was cancelled by the receiver"
            if request_id in self._doomed:
                return False, self._doomed[request_id]
            req = self._reqs.get(request_id)
            if req is None:
                return True, "buffered until the receiver expects the request"
            return req.status is not TransferStatus.FAILED, req.error or req.status.value

    # ------------------------------------------------------------------------ internals
    def _get(self, request_id: str) -> _Request:
        req = self._reqs.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not expected by this receiver")
        return req

    def _verify(self, chunk: KVChunk) -> str | None:
        """Size and checksum problems of a chunk, independent of the request's state."""
        want = chunk.num_pages * self.layout.page_bytes
        if chunk.num_pages <= 0:
            return f"chunk claims {chunk.num_pages} pages"
        if chunk.nbytes < want:
            return f"truncated chunk (layer {chunk.layer}, first_page {chunk.first_page}): {chunk.nbytes} bytes for {chunk.num_pages} pages of {self.layout.page_bytes}"
        if chunk.nbytes > want:
            return f"over-long chunk (layer {chunk.layer}, first_page {chunk.first_page}): {chunk.nbytes} bytes for {chunk.num_pages} pages of {self.layout.page_bytes}"
        got = tensor_checksum(chunk.payload)
        if got != chunk.checksum:
            return f"checksum mismatch (layer {chunk.layer}, first_page {chunk.first_page}): got {got:#010x}, sender said {chunk.checksum:#010x}"
        return None

    def _apply_chunk(self, rid: str, req: _Request, chunk: KVChunk, problem: str | None) -> None:
        if req.status is TransferStatus.FAILED:
            return
        if req.status is TransferStatus.DONE:
            problem = "chunk arrived after the request was DONE"
        elif problem is None:
            problem = self._range_problem(req, chunk.layer, chunk.first_page, chunk.num_pages)
        if problem is not None:
            self._fail(rid, req, problem)
            return
        n, first = chunk.num_pages, chunk.first_page
        try:
            self._write(chunk.layer, req.block_ids[first : first + n], chunk.payload)
        except Exception as e:  # noqa: BLE001 - e.g. device OOM: fail the request, keep the link
            self._fail(rid, req, f"writing into the cache failed: {type(e).__name__}: {e}")
            return
        self._landed(rid, req, chunk.layer, first, n)

    def _landed(self, rid: str, req: _Request, layer: int, first: int, n: int) -> None:
        self.bytes_received += n * self.layout.page_bytes
        req.written[layer, first : first + n] = True
        req.received += 1
        req.status = TransferStatus.TRANSFERRING
        self._maybe_done(rid, req)

    def _write(self, layer: int, block_ids: list[int], payload: torch.Tensor) -> None:
        """Copy a verified payload (``len(block_ids)`` pages of bytes) into the cache."""
        if self._scatter is not None:  # CPU cache: memcpy per run of consecutive blocks
            self._scatter.write(layer, block_ids, tensor_bytes(payload).numpy())
            return
        raw = payload.detach().contiguous().reshape(-1).view(torch.uint8)  # stays on its device
        if raw.storage_offset() % self.layout.torch_dtype.itemsize:
            raw = raw.clone()  # misaligned view (e.g. of a transport buffer): realign
        # pages: [n, 2, block_size, Hkv, D] reinterpreted from the payload bytes
        pages = raw.view(self.layout.torch_dtype).view(len(block_ids), *self.layout.page_shape)
        self.cache.write_pages(layer, block_ids, pages)

    def _range_problem(self, req: _Request, layer: int, first_page: int, num_pages: int) -> str | None:
        if not 0 <= layer < self.layout.num_layers:
            return f"chunk for layer {layer}, layout has {self.layout.num_layers} layers"
        end = first_page + num_pages
        if first_page < 0 or end > len(req.block_ids):
            return f"chunk pages [{first_page}, {end}) outside the {len(req.block_ids)} reserved blocks"
        return None

    def _apply_finish(self, rid: str, req: _Request, num_chunks: int) -> None:
        if req.status.terminal:
            return
        if req.promised is not None:
            self._fail(rid, req, f"second finish ({num_chunks} chunks after {req.promised})")
            return
        req.promised = num_chunks
        self._maybe_done(rid, req)

    def _maybe_done(self, rid: str, req: _Request) -> None:
        if req.promised is None or req.received < req.promised:
            return
        if req.received > req.promised:
            self._fail(rid, req, f"over-long stream: {req.received} chunks, sender promised {req.promised}")
            return
        rows = req.written
        if not rows.any() or not (rows == rows[0]).all():
            bad = [
                layer for layer in range(rows.shape[0]) if not (rows[layer] == rows[0]).all() or not rows[layer].any()
            ]
            self._fail(rid, req, f"incomplete transfer: layers {bad} did not receive the same pages as layer 0")
            return
        req.status = TransferStatus.DONE
        self._retire(rid)

    def _fail(self, rid: str, req: _Request, why: str) -> None:
        req.status = TransferStatus.FAILED
        req.error = f"request {rid!r}: {why}"
        self._retire(rid)

    def _retire(self, rid: str) -> None:
        self._terminal.append(rid)
        if self.on_terminal is not None:
            self.on_terminal()
        while len(self._terminal) > _MAX_TERMINAL:
            old = self._terminal.popleft()
            req = self._reqs.get(old)
            if req is not None and req.status.terminal:
                del self._reqs[old]
                self._tombstone(old, done=req.status is TransferStatus.DONE)

    def _room_for(self, rid: str, nbytes: int) -> bool:
        """Whether the early buffer can take ``nbytes`` more; if not, doom ``rid``."""
        if self._early_bytes + nbytes <= self.max_unexpected_bytes:
            return True
        self._doom(
            rid, f"chunks arrived before expect() and overflowed the {self.max_unexpected_bytes}-byte early buffer"
        )
        return False

    def _buffer(self, rid: str, chunk: KVChunk, owned: bool = False) -> None:
        nbytes = chunk.nbytes
        if not self._room_for(rid, nbytes):
            return
        if not owned:  # copy: the payload may be a borrowed view of transport memory
            chunk = KVChunk(
                chunk.request_id,
                chunk.layer,
                chunk.first_page,
                chunk.num_pages,
                chunk.payload.detach().clone(),
                chunk.checksum,
            )
        early = self._early.setdefault(rid, _Early())
        early.events.append(chunk)
        early.nbytes += nbytes
        self._early_bytes += nbytes

    def _drop_early(self, rid: str) -> _Early | None:
        early = self._early.pop(rid, None)
        if early is not None:
            self._early_bytes -= early.nbytes
        return early

    def _doom(self, rid: str, why: str) -> None:
        self._drop_early(rid)
        self._doomed[rid] = why
        while len(self._doomed) > _MAX_TOMBSTONES:
            self._doomed.popitem(last=False)

    def _tombstone(self, rid: str, done: bool = False) -> None:
        self._tombstones[rid] = done
        self._tombstones.move_to_end(rid)
        while len(self._tombstones) > _MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)


class BookedReceiver(KVReceiver):
    """KVReceiver whose request state lives in a ReceiverBook; transports add ``address``
    and ``close`` and feed ``self.book`` from their receive threads."""

    def __init__(self, layout: KVLayout, cache: PagedKVCache | PageSink, max_unexpected_bytes: int = 64 << 20):
        super().__init__(layout, cache)
        self.book = ReceiverBook(layout, cache, max_unexpected_bytes, on_terminal=self._terminal_reached)

    def _terminal_reached(self) -> None:
        if self.on_terminal is not None:
            self.on_terminal()

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        self.book.expect(request_id, block_ids)

    def poll(self, request_id: str) -> TransferStatus:
        return self.book.poll(request_id)

    def cancel(self, request_id: str) -> None:
        self.book.cancel(request_id)

    def error(self, request_id: str) -> str | None:
        return self.book.error(request_id)

    @property
    def bytes_received(self) -> int:
        return self.book.bytes_received
