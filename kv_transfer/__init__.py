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


__all__ = [
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
