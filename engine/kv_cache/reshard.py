"""Resharding KV pages along the head axis, between layouts that differ only in their head
partition (engine/kv_cache/layout.py): a TP=1 page split into TP ranks' slices, or the ranks'
slices gathered back into whole pages.

Pages are ``[n, 2, block_size, Hkv, D]`` (a layer's run of pages; dim 3 is the head axis),
or ``[L, n, 2, block_size, Hkv, D]`` for every layer at once (``head_dim=-2`` either way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch

_HEAD_AXIS = -2  # [..., Hkv, D]


def slice_heads(pages: torch.Tensor, src: KVLayout, dst: KVLayout) -> torch.Tensor:
    """The heads of ``dst`` cut out of ``pages`` (held as ``src``): a view, [..., dst Hkv, D].
    ``dst``'s heads must lie within ``src``'s; any other mismatch raises KVLayoutMismatch."""
    shared = src.reconcile(dst)
    if shared != dst.heads:
        raise KVLayoutMismatch(f"cannot cut {dst.partition_str()} out of pages holding {src.partition_str()}")
    if pages.shape[_HEAD_AXIS] != src.num_kv_heads:
        raise ValueError(
            f"pages hold {pages.shape[_HEAD_AXIS]} heads, layout {src.partition_str()} says {src.num_kv_heads}"
        )
    lo = dst.kv_head_start - src.kv_head_start
    return pages.narrow(_HEAD_AXIS, lo, dst.num_kv_heads)


def gather_heads(slices: Sequence[torch.Tensor], layouts: Sequence[KVLayout], dst: KVLayout) -> torch.Tensor:
    """``dst``'s pages from slices held as ``layouts`` (in any order), which must tile ``dst``'s
    heads exactly (no gap, no overlap); a new tensor, [..., dst Hkv, D]."""
    if len(slices) != len(layouts) or not slices:
        raise ValueError(f"{len(slices)} slices for {len(layouts)} layouts")
    order = sorted(range(len(layouts)), key=lambda i: layouts[i].kv_head_start)
    at = dst.kv_head_start
    for i in order:
        dst.reconcile(layouts[i])
        if layouts[i].kv_head_start != at:
            raise KVLayoutMismatch(
                f"slices do not tile {dst.partition_str()}: expected one starting at head {at}, "
                f"got {layouts[i].partition_str()}"
            )
        if slices[i].shape[_HEAD_AXIS] != layouts[i].num_kv_heads:
            raise ValueError(
                f"slice {i} holds {slices[i].shape[_HEAD_AXIS]} heads, its layout says {layouts[i].num_kv_heads}"
            )
        at += layouts[i].num_kv_heads
    if at != dst.heads.stop:
        raise KVLayoutMismatch(f"slices end at head {at}, {dst.partition_str()} ends at {dst.heads.stop}")
    return torch.cat([slices[i] for i in order], dim=_HEAD_AXIS)
