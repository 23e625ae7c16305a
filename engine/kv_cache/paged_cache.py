"""Paged K/V tensors, addressed by block id (see KVLayout for the geometry)."""

from __future__ import annotations

import torch

from engine.kv_cache.layout import KVLayout


class PagedKVCache:
    """Owns the KV tensor ``kv: [num_layers, num_blocks, 2, block_size, Hkv, D]``.

    Block ids come from the BlockPool; this class only stores bytes. A token at cache slot
    ``s`` lives at block ``s // block_size``, offset ``s % block_size``.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu"):
        self.layout = layout
        self.num_blocks = num_blocks
        self.kv = torch.zeros(
            (layout.num_layers, num_blocks, *layout.page_shape), dtype=layout.torch_dtype, device=device
        )

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
