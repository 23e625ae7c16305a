"""Paged K/V tensors, addressed by block id (see KVLayout for the geometry).

A CPU cache can be *shared* (``shared=True``): ``kv`` then lives in an anonymous memfd
(``os.memfd_create``, mmapped MAP_SHARED) whose fd, ``shared_fd``, another process can
receive over a Unix socket (SCM_RIGHTS) and map read-only: the shm KV transport lets the
receiver copy pages straight out of the sender's cache. Nothing is ever named in the file
system (/dev/shm stays empty), so a SIGKILLed process leaks nothing: the memory goes away
with the last fd or mapping. The file is sealed against shrinking, so a peer's mapping can
never fault (SIGBUS) on a truncated file. Lifecycle: the fd is closed when this object is
garbage collected; mappings made from it elsewhere stay valid until they are unmapped.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref

import torch

from engine.kv_cache.layout import KVLayout


class PagedKVCache:
    """Owns the KV tensor ``kv: [num_layers, num_blocks, 2, block_size, Hkv, D]``.

    Block ids come from the BlockPool; this class only stores bytes. A token at cache slot
    ``s`` lives at block ``s // block_size``, offset ``s % block_size``.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu", shared: bool = False):
        self.layout = layout
        self.num_blocks = num_blocks
        self.shared_fd: int | None = None  # memfd holding ``kv`` (shared caches only)
        shape = (layout.num_layers, num_blocks, *layout.page_shape)
        if not shared:
            self.kv = torch.zeros(shape, dtype=layout.torch_dtype, device=device)
            return
        if torch.device(device).type != "cpu":
            raise ValueError(f"a shared KV cache must live in CPU memory, not on {device}")
        nbytes = layout.num_layers * num_blocks * layout.page_bytes
        fd = os.memfd_create("splitserve-kv-cache", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)  # zero-filled, like torch.zeros
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._mm = mmap.mmap(fd, nbytes)  # MAP_SHARED, read-write
        except BaseException:
            os.close(fd)
            raise
        self.shared_fd = fd
        weakref.finalize(self, os.close, fd)
        # via torch.frombuffer: the tensor keeps the mmap object alive; no numpy buffer export
        self.kv = torch.frombuffer(self._mm, dtype=torch.uint8).view(layout.torch_dtype).view(shape)
        # Fault every page in now, as torch.zeros does for a private cache: otherwise each
        # block's first write takes shmem page faults inside a prefill step, and with the pool
        # cycling through its free list that cost lasts until every block was used once.
        # Writing one zero per page is enough (the file is zero-filled): ~0.35 s per GiB here.
        self.kv.view(torch.uint8).view(-1)[:: mmap.PAGESIZE].zero_()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one layer, each ``[num_blocks, block_size, Hkv, D]``."""
        return self.kv[layer, :, 0], self.kv[layer, :, 1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens. slots: [T] int64; k, v: [T, Hkv, D]."""
        bs = self.layout.block_size
        flat = self.kv[layer].view(self.num_blocks, 2, bs, *k.shape[1:])
        blocks, offs = slots // bs, slots % bs
        flat[blocks, 0, offs] = k
        flat[blocks, 1, offs] = v

    def read_pages(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """Copy of one layer's pages: [len(block_ids), 2, block_size, Hkv, D]."""
        return self.kv[layer, block_ids].clone()

    def write_pages(self, layer: int, block_ids: list[int], pages: torch.Tensor) -> None:
        """Overwrite one layer's pages with ``pages: [len(block_ids), 2, block_size, Hkv, D]``."""
        self.kv[layer, block_ids] = pages.to(self.kv.device, self.kv.dtype)

    @staticmethod
    def blocks_for_memory(layout: KVLayout, gigabytes: float) -> int:
        return max(1, int(gigabytes * (1 << 30)) // (layout.page_bytes * layout.num_layers))
