"""Byte-level hot path shared by the transports: the chunk checksum, copies fused with it,
and the scatter of verified page bytes into a CPU PagedKVCache.

Checksum: xxh3-64 (``xxhash``, ~30 GB/s on one core, 5x+ faster than zlib's crc32) of the
bytes, folded to 32 bits (high word xor low word) so it fits every wire format (the gRPC
proto field is a uint32). xxh3 mixes in the length and every byte's position, so a flipped,
missing, extra or moved byte goes unnoticed with probability ~2**-32 (crc32 does as well on
random corruption; unlike crc32 there is no hard guarantee for single-bit errors). Inputs
are fed to a streaming hasher piece by piece (``_HASH_PIECE``): the same digest as one call
over the concatenated bytes, so a checksum can be taken over pages scattered in a cache
(``checksum_pages``) and compared with one taken over the same pages gathered in a chunk.

Copies fused with the checksum work piece by piece so the second pass over a piece hits the
CPU cache, not DRAM:
- ``copy_with_checksum`` hashes each piece of the source, then copies it (the sender side of
  the shm ring: the checksum describes the pages as the sender saw them);
- ``copy_pages_with_checksum`` copies each piece, then hashes the *destination* piece (the
  one-copy receiver: the checksum describes exactly the bytes that landed, even if a writer
  changed the source under the copy, so a stale or torn read can never verify by accident).

Pages (``checksum_pages``, ``copy_pages_with_checksum``) go through the native kernel
``xxh3_pages`` (engine/native/csrc/xxh3_pages.cpp) when it is built and the pages qualify
(page_bytes a multiple of 64, more than 240 bytes in all): the same XXH3-64 digest in one pass
of AVX-512 code with no Python per piece, and for the copy each 64-byte stripe is loaded into
a register once, stored to the destination (non-temporal stores) and hashed from that
register, so the digest is of exactly the bytes written and the copy runs at memcpy speed.
Otherwise (native kernels disabled or unbuilt, odd page sizes) the numpy/xxhash pieces below
do the same work with the same digests; ``warm_native`` loads the kernel ahead of the first
transfer (a first build compiles for ~1-2 minutes; never under a lock).

All functions take C-contiguous ``np.uint8`` arrays (``tensor_bytes(t).numpy()``, or
``page_rows``): numpy's copy is one glibc memcpy on the calling thread, releases the GIL and
costs ~1 us a call, where torch's ``copy_`` would also wake the intra-op pool, whose threads
then compete for cores with the other side of the transfer (and with the engine). xxhash
releases the GIL while it hashes a buffer as well.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import xxhash

from engine import native
from engine.kv_cache.paged_cache import PagedKVCache

_HASH_PIECE = 1 << 20  # longest single xxhash call, in bytes
# copy_with_checksum: hash a piece of src, then copy it while it is still in L2
_COPY_PIECE = 256 << 10
# copy_pages_with_checksum: copy a piece, then hash it from dst while it is still in L2
# (measured on a 1 MiB-L2 EPYC: 512 KiB pieces run at ~0.9-0.95x a plain memcpy)
_LAND_PIECE = 512 << 10


def warm_native() -> bool:
    """Load the native ``xxh3_pages`` kernel now (building it if this machine has no build
    yet); whether it is available. Transports call this when they are created, so the first
    transfer never waits for a compiler (and never while holding a lock)."""
    return _xxh3() is not None


def _xxh3() -> ModuleType | None:
    """The native module when it has ``xxh3_pages`` (engine.native.load caches the build,
    once per process, under its own lock)."""
    mod = native.load()
    return mod if mod is not None and hasattr(mod, "xxh3_pages") else None


def _native_for(rows: np.ndarray, n: int) -> ModuleType | None:
    """The native module if pages of ``rows: [N, page_bytes]`` qualify for ``xxh3_pages``."""
    page_bytes = rows.shape[1]
    if page_bytes % 64 or n * page_bytes <= 240 or not rows.flags.c_contiguous:
        return None
    return _xxh3()


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


def page_rows(kv: torch.Tensor, page_bytes: int) -> np.ndarray:
    """A contiguous CPU cache tensor ``kv: [L, num_blocks, ...]`` as a ``[L, num_blocks,
    page_bytes]`` uint8 numpy view of the same memory (never a copy: writes go to ``kv``)."""
    if kv.device.type != "cpu" or not kv.is_contiguous():
        raise ValueError("page_rows needs a contiguous CPU tensor")
    return kv.view(torch.uint8).view(kv.shape[0], -1, page_bytes).numpy()


def _runs(ids: list[int], other: list[int] | None = None):
    """``(i, n)`` for each maximal run ``ids[i : i + n]`` of consecutive values (consecutive
    in ``other`` too, when given: one memcpy moves such a run)."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1 or (other is not None and other[i] != other[i - 1] + 1):
            yield start, i - start
            start = i


def checksum_pages(rows: np.ndarray, ids: list[int]) -> int:
    """``checksum_bytes`` of pages ``rows[ids]`` concatenated in ``ids`` order, hashed in
    place (``rows: [num_blocks, page_bytes]`` uint8; nothing is gathered)."""
    mod = _native_for(rows, len(ids))
    if mod is not None:
        return _fold(mod.xxh3_pages(rows, ids, page_bytes=rows.shape[1]))
    h = xxhash.xxh3_64()
    for i, n in _runs(ids):
        flat = rows[ids[i] : ids[i] + n].reshape(-1)  # a view: the run is contiguous
        for o in range(0, flat.nbytes, _HASH_PIECE):
            h.update(flat[o : o + _HASH_PIECE])
    return _fold(h.intdigest())


def copy_pages_with_checksum(dst: np.ndarray, dst_ids: list[int], src: np.ndarray, src_ids: list[int]) -> int:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for every ``i`` (``dst: [Nd, P]``, ``src: [Ns, P]``
    uint8 rows; ids in range, same length), one memcpy per piece of each run consecutive on
    both sides. Returns the checksum of the bytes *written*, in order: each piece is hashed
    from ``dst`` right after it was copied, so it equals ``checksum_pages(src, src_ids)``
    exactly when the bytes that landed are the ones the sender hashed. (The native kernel
    hashes each stripe from the register it stores: the same guarantee, one pass.)"""
    if len(dst_ids) != len(src_ids) or dst.shape[1] != src.shape[1]:
        raise ValueError(
            f"copy_pages_with_checksum: {len(dst_ids)} -> {len(src_ids)} pages, rows {dst.shape} / {src.shape}"
        )
    mod = _native_for(src, len(src_ids)) if dst.flags.c_contiguous else None
    if mod is not None:  # one pass: each stripe hashed from the register it is stored from
        return _fold(mod.xxh3_pages(src, src_ids, dst, dst_ids, page_bytes=src.shape[1]))
    h = xxhash.xxh3_64()
    for i, n in _runs(dst_ids, src_ids):
        d = dst[dst_ids[i] : dst_ids[i] + n].reshape(-1)
        s = src[src_ids[i] : src_ids[i] + n].reshape(-1)
        for o in range(0, d.nbytes, _LAND_PIECE):
            piece = d[o : o + _LAND_PIECE]
            np.copyto(piece, s[o : o + _LAND_PIECE])
            h.update(piece)
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

    def rows(self, layer: int) -> np.ndarray:
        """``[num_blocks, page_bytes]`` uint8 view of one layer of the cache."""
        kv = self.cache.kv
        if self._kv is not kv:  # first use, or the cache swapped its tensor
            # view, never reshape: a copy would swallow the writes silently
            self._pages = page_rows(kv, self.cache.layout.page_bytes)
            self._kv = kv
        return self._pages[layer]

    def write(self, layer: int, block_ids: list[int], raw: np.ndarray) -> None:
        """``raw: [len(block_ids) * page_bytes] uint8`` -> pages ``block_ids`` of ``layer``."""
        dst = self.rows(layer)  # [num_blocks, page_bytes]
        src = raw.reshape(len(block_ids), dst.shape[1])
        for i, n in _runs(block_ids):
            b = block_ids[i]
            np.copyto(dst[b : b + n], src[i : i + n])

    def copy_pages(self, layer: int, block_ids: list[int], src: np.ndarray, src_ids: list[int]) -> int:
        """Pages ``src[src_ids]`` (``src: [Ns, page_bytes]`` uint8, e.g. a mapping of another
        process's cache) -> pages ``block_ids`` of ``layer``; returns the checksum of the
        bytes written (see ``copy_pages_with_checksum``)."""
        return copy_pages_with_checksum(self.rows(layer), block_ids, src, src_ids)
