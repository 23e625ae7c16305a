"""Native CPU paged decode attention (engine/native/csrc/paged_decode.cpp) for TorchSDPABackend.

The decode group (one query row per sequence) reads K/V straight from the cache pages: each
page is read once, instead of ``gather_pages`` copying padded pages into a contiguous buffer
that SDPA then reads again (about 3x the memory traffic).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from engine import native


def native_decode_module(cache_device: torch.device) -> ModuleType | None:
    """The compiled kernels when the cache lives on CPU and they build; else None (torch path)."""
    if cache_device.type != "cpu":
        return None
    return native.load()


def paged_decode(
    module: ModuleType,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> torch.Tensor:
    """q: [G, H, D] (position seq_lens - 1); k/v_cache: [num_blocks, bs, Hkv, D] views;
    block_table: [G, nblk] int64; seq_lens: [G] int64 -> [G, H, D] with SDPA's 1/sqrt(D) scale."""
    window = -1 if sliding_window is None else sliding_window
    return module.paged_decode(q, k_cache, v_cache, block_table, seq_lens, 1.0 / math.sqrt(q.shape[-1]), window)
