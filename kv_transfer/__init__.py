"""splitserve kv_transfer: move a request's K/V pages from a prefill worker's cache into
reserved blocks of a decode worker's PagedKVCache, layer by layer.

``make_sender(kind, layout, **opts)`` / ``make_receiver(kind, layout, cache, **opts)`` build
a transport pair; see ``kv_transfer.base`` for the contract and the poll state machine.

    kind        module           use
    "loopback"  loopback.py      in-process (tests, single-process setups)
    "shm"       shm.py           same node, different processes (shared-memory arena)
    "torch"     torch_dist.py    torch.distributed p2p: gloo (CPU cache) / NCCL (CUDA cache)
    "grpc"      grpc_transport   any network, no collective backend needed

Transport modules are imported lazily, so e.g. a loopback-only process never imports grpc.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer.base import KVChunk, KVReceiver, KVSender, KVTransferError, PageSink, TransferStatus, tensor_checksum

# kind -> (module, sender class, receiver class)
TRANSPORTS: dict[str, tuple[str, str, str]] = {
    "loopback": ("kv_transfer.loopback", "LoopbackSender", "LoopbackReceiver"),
    "shm": ("kv_transfer.shm", "ShmSender", "ShmReceiver"),
    "torch": ("kv_transfer.torch_dist", "TorchDistSender", "TorchDistReceiver"),
    "grpc": ("kv_transfer.grpc_transport", "GrpcSender", "GrpcReceiver"),
}


def _transport(kind: str) -> tuple[Any, str, str]:
    if kind not in TRANSPORTS:
        raise ValueError(f"unknown KV transport kind {kind!r}; expected one of {sorted(TRANSPORTS)}")
    module, sender, receiver = TRANSPORTS[kind]
    return importlib.import_module(module), sender, receiver


def make_sender(kind: str, layout: KVLayout, **opts: Any) -> KVSender:
    """A sender of transport ``kind``; call ``connect(receiver.address)`` before ``send``."""
    module, sender, _ = _transport(kind)
    return getattr(module, sender)(layout, **opts)


def make_receiver(kind: str, layout: KVLayout, cache: PagedKVCache | PageSink, **opts: Any) -> KVReceiver:
    """A receiver of transport ``kind`` writing into ``cache`` (a PagedKVCache, or a PageSink such
    as a tensor-parallel worker's head-splitting one); it listens once built."""
    module, _, receiver = _transport(kind)
    return getattr(module, receiver)(layout, cache, **opts)


NETWORK_KINDS = ("grpc", "torch")  # receivers that listen on a ``host`` option


@dataclass(frozen=True)
class ReceiverFactory:
    """``make_receiver`` of ``kind`` deferred to where the cache exists: a worker that is not
    allowed to import kv_transfer (an attention worker, attention_offload/ is its sibling) is
    handed one of these (picklable: it crosses into a Ray actor) and calls it with its own
    cache. ``host``: the node's address, the default listening host of network kinds."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _transport(self.kind)  # an unknown kind fails here, naming it

    def __call__(self, layout: KVLayout, cache: PagedKVCache | PageSink, host: str | None = None) -> KVReceiver:
        opts = dict(self.options)
        if host is not None and self.kind in NETWORK_KINDS:
            opts.setdefault("host", host)
        return make_receiver(self.kind, layout, cache, **opts)


__all__ = [
    "NETWORK_KINDS",
    "ReceiverFactory",
    "TRANSPORTS",
    "KVChunk",
    "KVLayoutMismatch",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "PageSink",
    "TransferStatus",
    "make_receiver",
    "make_sender",
    "tensor_checksum",
]
