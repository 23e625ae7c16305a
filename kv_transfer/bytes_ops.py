"""Byte-level hot path shared by the transports: the chunk checksum, a copy fused with it,
and the scatter of verified page bytes into a CPU PagedKVCache.

Checksum: xxh3-64 (``xxhash``, ~20 GB/s on one core, 5x+ faster than zlib's crc32) of the
bytes, folded to 32 bits (high word xor low word) so it fits every wire format (the gRPC
proto field is a uint32). xxh3 mixes in the length and every byte's position, so a flipped,
missing, extra or moved byte goes unnoticed with probability ~2**-32 (crc32 does as well on
random corruption; unlike crc32 there is no hard guarantee for single-bit errors). Inputs
longer than ``_HASH_PIECE`` are fed to a streaming hasher piece by piece: the same digest as
one call, but xxhash holds the GIL for one piece at a time.

All functions take flat C-contiguous ``np.uint8`` arrays (``tensor_bytes(t).numpy()``):
numpy's copy is one glibc memcpy on the calling thread, releases the GIL and costs ~1 us a
call, where torch's ``copy_`` would also wake the intra-op pool, whose threads then compete
for cores with the other side of the transfer (and with the engine).
"""

from __future__ import annotations

import numpy as np
import torch
import xxhash

from engine.kv_cache.paged_cache import PagedKVCache

_HASH_PIECE = 1 << 20  # longest GIL hold of the checksum, in bytes
# copy_with_checksum: hash a piece of src, then copy it while it is still in L2
_COPY_PIECE = 256 << 10


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat CPU uint8 tensor (no copy when already CPU-contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def _fold(h64: int) -> int:
    return (h64 ^ (h64 >> 32)) & 0xFFFFFFFF


def checksum_bytes(buf: np.ndarray) -> int:
    """Checksum (32-bit int) of ``buf: [n] uint8``, C-contiguous."""
    if buf.nbytes <= _HASH_PIECE:
        return _fold(xxhash.xxh3_64_intdigest(buf))
    h = xxhash.xxh3_64()
    for o in range(0, buf.nbytes, _HASH_PIECE):
        h.update(buf[o : o + _HASH_PIECE])
    return _fold(h.intdigest())


def copy_with_checksum(dst: np.ndarray, src: np.ndarray) -> int:
    """``dst[:] = src`` (both ``[n] uint8``), returning ``checksum_bytes(src)``. Each piece
    of ``src`` is hashed before it is copied, so the checksum describes the source bytes
    (as the sender saw them) and ``src`` crosses the memory bus once, not twice."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_with_checksum: dst {dst.shape} != src {src.shape}")
    h = xxhash.xxh3_64()
    for o in range(0, src.nbytes, _COPY_PIECE):
        piece = src[o : o + _COPY_PIECE]
        h.update(piece)
        np.copyto(dst[o : o + _COPY_PIECE], piece)
    return _fold(h.intdigest())


class PageScatter:
    """Writes page bytes into ``cache.kv`` — same effect as ``cache.write_pages`` — as a few
    memcpys: one per run of consecutive destination block ids, straight from the source
    bytes (e.g. a shared-memory ring slot), with no dtype view or alignment requirement.
    Only for a contiguous CPU cache (``supports``); callers fall back to write_pages."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self._kv: torch.Tensor | None = None  # the cache.kv the view below was made from
        self._pages: np.ndarray | None = None  # [num_layers, num_blocks, page_bytes] uint8 view

    @staticmethod
    def supports(cache: PagedKVCache) -> bool:
        return cache.kv.device.type == "cpu" and cache.kv.is_contiguous()

    def write(self, layer: int, block_ids: list[int], raw: np.ndarray) -> None:
        """``raw: [len(block_ids) * page_bytes] uint8`` -> pages ``block_ids`` of ``layer``."""
        kv = self.cache.kv
        if self._kv is not kv:  # first use, or the cache swapped its tensor
            lay = self.cache.layout
            # view, never reshape: a copy would swallow the writes silently
            self._pages = kv.view(torch.uint8).view(lay.num_layers, -1, lay.page_bytes).numpy()
            self._kv = kv
        dst = self._pages[layer]  # [num_blocks, page_bytes]
        src = raw.reshape(len(block_ids), dst.shape[1])
        start = 0
        for i in range(1, len(block_ids) + 1):
            if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
                b = block_ids[start]
                np.copyto(dst[b : b + i - start], src[start:i])
                start = i
