"""KV transfer contract: chunks, checksums, and the KVSender / KVReceiver ABCs.

A prefill worker pushes each layer's K/V pages of a request as soon as that layer is
computed; the decode worker has reserved blocks for the request in its own PagedKVCache
and receives into them, then admits the request. Block ids differ on each side, so a chunk
addresses pages by their index *within the request* (``first_page``); the receiver maps
page ``i`` to ``block_ids[i]`` of the list given to ``expect``. A prompt prefilled in
several chunks produces several chunks per layer.

Wire unit (every transport carries the same fields)::

    KVChunk(request_id, layer, first_page, num_pages, payload, checksum)
    payload: [num_pages, 2, block_size, Hkv, D] in the layout dtype (page bytes, in order)
    checksum: tensor_checksum of the payload bytes (xxh3, 32 bits), computed by the sender
              before the bytes move, verified by the receiver on the bytes as they landed

Sender lifecycle::

    s = make_sender(kind, layout); s.connect(receiver.address)   # layouts compared here
    s.send(rid, layer, first_page, pages)   # x N, non-blocking, any order of layers; or
    s.send_blocks(rid, layer, first_page, cache, block_ids)   # the same chunk, by reference
    s.finish(rid, num_chunks=N)             # end of the request's stream
    s.poll(rid)                             # DONE: pages no longer needed on this side

``send`` takes a tensor the sender owns from then on. ``send_blocks`` names pages of the
caller's own PagedKVCache instead; the checksum is taken from them during the call, and a
transport may read them later (shm with a shared cache: the receiver copies them straight
out of the sender's memory, one copy in total), so the caller must leave those blocks
unchanged until ``poll`` reports DONE or FAILED. A block written earlier fails the request
at the receiver's checksum (loud, never silent). Transports without a zero-copy path copy
the pages out at once (``KVSender.send_blocks``).

Receiver poll state machine (one per request)::

    expect(rid, block_ids)
        │
        v
    BOOTSTRAPPING ──first verified chunk written──> TRANSFERRING
        │                                               │
        │   finish(N) seen and N chunks verified+written │ (any order of finish and chunks)
        └───────────────────────┬───────────────────────┘
                                v
                              DONE
    BOOTSTRAPPING / TRANSFERRING ──> FAILED on: checksum mismatch; truncated or over-long
        chunk; page or layer out of range; more than N chunks; a second finish; layers that
        did not all receive the same pages (checked at N); the stream/link breaking first.
    cancel(rid): forget the request in any state; chunks arriving later are dropped unwritten.

DONE and FAILED are terminal: nothing is written for a request after it reaches either.
A FAILED chunk of a ``send`` is never written into the cache, so its destination blocks
keep whatever they held; a by-reference chunk is verified as it lands, so a failing one may
leave garbage in the request's own reserved blocks (never in anyone else's: the request is
FAILED and never admitted). DONE also requires that every layer received the same,
non-empty set of pages (a missing layer is an error, not silently garbage attention).

Chunks for a request that has not been ``expect``-ed yet are *buffered* (copied, up to
``max_unexpected_bytes`` per receiver) and replayed when ``expect`` arrives: the router may
start the prefill before the decode worker has reserved blocks. If that buffer overflows,
the request is marked doomed and fails loudly at ``expect``.

Sender poll: BOOTSTRAPPING (queued, nothing on the wire yet) -> TRANSFERRING -> DONE (every
chunk and the end-of-stream marker left this process; the gRPC transport also waits for the
receiver's acknowledgement; shm waits for the acknowledgement of every by-reference chunk)
or FAILED (link error, or the receiver's ack reported failure).
Receiver-side verification is authoritative: the decode worker trusts only its own poll.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.bytes_ops import checksum_bytes, tensor_bytes


class TransferStatus(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED)


class KVTransferError(RuntimeError):
    """A transfer could not be set up or was misused (send after finish, link broken, ...)."""


class KVLinkBroken(KVTransferError):
    """The link to the receiver is gone (its process died, the connection dropped): nothing
    more can be sent over it. The other KVTransferErrors are misuse or configuration errors."""


def tensor_checksum(t: torch.Tensor) -> int:
    """Checksum of the tensor's bytes: xxh3-64 folded to 32 bits (see ``bytes_ops``), so a
    flipped, missing, extra or moved byte escapes it with probability ~2**-32. CUDA tensors
    are hashed from a host copy."""
    return checksum_bytes(tensor_bytes(t).numpy())


@dataclass
class KVChunk:
    """One contiguous run of a request's pages for one layer."""

    request_id: str
    layer: int
    first_page: int  # index of the first page within the request (not a block id)
    num_pages: int  # pages the sender claims; the payload must hold exactly this many
    # payload: [num_pages, 2, block_size, Hkv, D] in the layout dtype; transports may carry
    # it as any tensor with the same bytes (e.g. flat uint8) and the receiver reinterprets.
    payload: torch.Tensor
    checksum: int

    @property
    def nbytes(self) -> int:
        return self.payload.numel() * self.payload.element_size()

    @staticmethod
    def seal(request_id: str, layer: int, first_page: int, pages: torch.Tensor) -> KVChunk:
        """Build a chunk from ``pages: [n, 2, block_size, Hkv, D]``, computing the checksum."""
        return KVChunk(request_id, layer, first_page, pages.shape[0], pages, tensor_checksum(pages))


# test hook: applied to each sealed chunk before it is transmitted (flip a byte, truncate)
FaultHook = Callable[[KVChunk], KVChunk]


def check_layouts(ours: KVLayout, theirs: KVLayout, who: str) -> None:
    """Raise KVLayoutMismatch naming each differing field (``who`` names the peer)."""
    try:
        ours.check_compatible(theirs)
    except KVLayoutMismatch as e:
        raise KVLayoutMismatch(f"{who}: {e} (ours != theirs)") from None


class KVSender(abc.ABC):
    """Pushes a request's K/V pages, layer by layer, to one receiver."""

    def __init__(self, layout: KVLayout):
        self.layout = layout

    @abc.abstractmethod
    def connect(self, peer: Any) -> None:
        """Handshake with the receiver at ``peer`` (its ``address``): send our KVLayout, get
        its KVLayout, raise KVLayoutMismatch naming the differing fields if they differ."""

    @abc.abstractmethod
    def send(self, request_id: str, layer: int, first_page: int, pages: torch.Tensor) -> None:
        """Queue ``pages: [n, 2, block_size, Hkv, D]`` (pages ``first_page..first_page+n-1``
        of the request, for ``layer``). Returns without waiting for the bytes to move; the
        sender owns ``pages`` from now on (the caller must not modify it)."""

    def send_blocks(
        self, request_id: str, layer: int, first_page: int, cache: PagedKVCache, block_ids: list[int]
    ) -> None:
        """Queue pages ``cache.kv[layer, block_ids]`` of the sender's own ``cache`` as one
        chunk (pages ``first_page..first_page+len(block_ids)-1`` of the request). The caller
        must not modify those blocks until ``poll(request_id)`` is DONE or FAILED: a
        transport may read them after this returns (see the module docstring). This
        default copies them out now and ``send``s the copy, so every transport supports it."""
        self.send(request_id, layer, first_page, cache.kv[layer, list(block_ids)])  # advanced index: a copy

    @abc.abstractmethod
    def finish(self, request_id: str, num_chunks: int) -> None:
        """Mark the end of the request's stream: exactly ``num_chunks`` chunks were sent."""

    @abc.abstractmethod
    def poll(self, request_id: str) -> TransferStatus:
        """Sender-side status (see the module docstring). KeyError for an unknown request."""

    @abc.abstractmethod
    def error(self, request_id: str) -> str | None:
        """Why the request FAILED, else None."""

    @property
    def link_error(self) -> str | None:
        """Why the link to the receiver is unusable (None while it works). A sender with a
        link error fails every later request: its owner closes it and connects a new one."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Flush queued work (bounded wait), then drop the connection. Idempotent."""


class PageSink(Protocol):
    """What a receiver writes through when it is given something other than a PagedKVCache
    (a tensor-parallel decode worker's head-splitting sink, decode_worker/tp_kv_receiver.py):
    verified pages go to ``write_pages``, never by memcpy into ``kv``."""

    layout: KVLayout

    @property
    def num_blocks(self) -> int: ...

    @property
    def kv(self) -> torch.Tensor: ...  # read for its device only

    def write_pages(self, layer: int, block_ids: list[int], pages: torch.Tensor) -> None: ...


class KVReceiver(abc.ABC):
    """Receives K/V pages into reserved blocks of a PagedKVCache (or a PageSink)."""

    def __init__(self, layout: KVLayout, cache: PagedKVCache | PageSink):
        check_layouts(layout, cache.layout, "receiver's own cache")
        self.layout = layout
        self.cache = cache
        # Called (from a transport thread, with the receiver's lock held: it must only signal,
        # e.g. EngineLoop.wake) each time a request's transfer becomes DONE or FAILED, so the
        # owner polls at once instead of on its next idle period. None: nobody to tell.
        self.on_terminal: Callable[[], None] | None = None

    @property
    @abc.abstractmethod
    def address(self) -> Any:
        """What a sender passes to ``connect``: a small picklable (and JSON-able) value."""

    @abc.abstractmethod
    def expect(self, request_id: str, block_ids: list[int]) -> None:
        """Register the destination blocks: page ``i`` of the request lands in
        ``block_ids[i]``. Buffered early chunks are applied now."""

    @abc.abstractmethod
    def poll(self, request_id: str) -> TransferStatus:
        """Receiver-side status (see the module docstring). KeyError for an unknown request."""

    def poll_many(self, request_ids: list[str]) -> dict[str, TransferStatus]:
        """``poll`` of each request, at once. A receiver whose requests' state lives elsewhere
        (an attention model worker's proxy: decode_worker/attention_receiver.py) answers with
        one round trip per store instead of one per request."""
        return {rid: self.poll(rid) for rid in request_ids}

    @property
    def bytes_received(self) -> int:
        """Page bytes verified and written into this receiver's cache (0 unless counted)."""
        return 0

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Abort or forget the request: drop its state; chunks arriving later are ignored and
        never written. Also the way to release a DONE/FAILED entry. Idempotent."""

    @abc.abstractmethod
    def error(self, request_id: str) -> str | None:
        """Why the request FAILED, else None."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting connections and release transport resources. Idempotent."""
