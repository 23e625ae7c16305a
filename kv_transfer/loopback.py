"""In-process loopback transport, for tests and single-process setups.

The receiver registers itself under a name in a process-wide registry; that name is its
``address``. The sender's worker thread hands sealed chunks straight to the receiver's book
(no copy until the book writes them into the cache), so it exercises the same sender queue,
checksum and receiver state machine as the real transports.
"""

from __future__ import annotations

import itertools
import threading
import weakref

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import FaultHook, KVChunk, KVTransferError, PageSink, check_layouts
from kv_transfer.receiver_book import BookedReceiver
from kv_transfer.sender_book import BookedSender

_registry: weakref.WeakValueDictionary[str, LoopbackReceiver] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
_names = itertools.count()


class LoopbackReceiver(BookedReceiver):
    def __init__(
        self,
        layout: KVLayout,
        cache: PagedKVCache | PageSink,
        *,
        name: str | None = None,
        max_unexpected_bytes: int = 64 << 20,
    ):
        super().__init__(layout, cache, max_unexpected_bytes)
        self._name = name if name is not None else f"loopback-{next(_names)}"
        self._closed = False
        with _registry_lock:
            if self._name in _registry:
                raise KVTransferError(f"a loopback receiver named {self._name!r} already exists")
            _registry[self._name] = self

    @property
    def address(self) -> str:
        return self._name

    def handshake(self, sender_layout: KVLayout) -> KVLayout:
        """Called by a connecting sender: refuse a mismatched layout, return ours."""
        if self._closed:
            raise KVTransferError(f"loopback receiver {self._name!r} is closed")
        check_layouts(self.layout, sender_layout, f"loopback receiver {self._name!r} refused the sender")
        return self.layout

    def deliver(self, chunk: KVChunk) -> None:
        if self._closed:
            raise KVTransferError(f"loopback receiver {self._name!r} is closed")
        self.book.on_chunk(chunk)

    def deliver_finish(self, request_id: str, num_chunks: int) -> None:
        if self._closed:
            raise KVTransferError(f"loopback receiver {self._name!r} is closed")
        self.book.on_finish(request_id, num_chunks)

    def close(self) -> None:
        self._closed = True
        with _registry_lock:
            if _registry.get(self._name) is self:
                del _registry[self._name]


class LoopbackSender(BookedSender):
    def __init__(self, layout: KVLayout, *, fault_hook: FaultHook | None = None):
        super().__init__(layout, fault_hook=fault_hook)
        self._peer: LoopbackReceiver | None = None

    def connect(self, peer: str) -> None:
        with _registry_lock:
            receiver = _registry.get(peer)
        if receiver is None:
            raise KVTransferError(f"no loopback receiver named {peer!r} in this process")
        theirs = receiver.handshake(self.layout)
        check_layouts(self.layout, theirs, f"loopback receiver {peer!r}")
        self._peer = receiver
        self._start(f"kv-loopback-send->{peer}")

    def _transmit_chunk(self, chunk: KVChunk) -> None:
        self._peer.deliver(chunk)

    def _transmit_finish(self, request_id: str, num_chunks: int) -> None:
        self._peer.deliver_finish(request_id, num_chunks)

    def _disconnect(self) -> None:
        self._peer = None
