"""KVLayout's head partition and engine/kv_cache/reshard.py: a whole page split into TP ranks'
slices and gathered back is the same page; slices that do not tile, or layouts that differ
beyond the partition, are refused naming what differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.reshard import gather_heads, slice_heads

WHOLE = KVLayout("float32", block_size=4, num_layers=3, num_kv_heads=6, head_dim=8)


def _pages(layout: KVLayout, n: int, layers: int | None = None) -> torch.Tensor:
    """Distinct values per element: [n, 2, bs, H, D], or [L, n, 2, bs, H, D] with ``layers``."""
    shape = (n, *layout.page_shape) if layers is None else (layers, n, *layout.page_shape)
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)


def test_tp_shards_partition_the_heads_contiguously_and_canonically() -> None:
    shards = [WHOLE.tp_shard(r, 3) for r in range(3)]
    assert [list(s.heads) for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert all(s.model_kv_heads == 6 and not s.is_whole for s in shards)
    assert shards[1].partition_str() == "heads [2, 4) of 6"
    assert shards[2].whole() == WHOLE  # canonical: an explicit total equal to the heads held is whole
    assert KVLayout("float32", 4, 3, 6, 8, kv_head_start=0, total_kv_heads=6) == WHOLE
    # replace() on a whole layout is the whole layout of another model
    assert dataclasses.replace(WHOLE, num_kv_heads=4).is_whole
    with pytest.raises(ValueError, match="does not divide 6 KV heads"):
        WHOLE.tp_shard(0, 4)
    with pytest.raises(ValueError, match=r"heads \[4, 8\) are not within the model's total_kv_heads 6"):
        KVLayout("float32", 4, 3, 4, 8, kv_head_start=4, total_kv_heads=6)


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_slice_then_gather_is_the_identity_for_one_layer_and_for_every_layer(world: int) -> None:
    shards = [WHOLE.tp_shard(r, world) for r in range(world)]
    for pages in (_pages(WHOLE, 5), _pages(WHOLE, 5, layers=WHOLE.num_layers)):
        slices = [slice_heads(pages, WHOLE, s) for s in shards]
        assert [t.shape[-2] for t in slices] == [6 // world] * world
        for s, t in zip(shards, slices, strict=True):  # rank r's heads are heads r*H/N.. of the page
            assert torch.equal(t, pages[..., s.kv_head_start : s.kv_head_start + s.num_kv_heads, :])
        # any order of the slices gathers to the same pages
        back = gather_heads(slices[::-1], shards[::-1], WHOLE)
        assert torch.equal(back, pages)


def test_a_slice_of_a_slice_and_a_partial_gather() -> None:
    half = WHOLE.tp_shard(1, 2)  # heads [3, 6)
    pages = _pages(half, 2)
    one = half.with_heads(4, 1)
    assert torch.equal(slice_heads(pages, half, one), pages[..., 1:2, :])
    two = [half.with_heads(3, 1), half.with_heads(4, 2)]
    assert torch.equal(gather_heads([pages[..., :1, :], pages[..., 1:, :]], two, half), pages)


def test_slices_that_do_not_tile_are_refused() -> None:
    a, b, c = (WHOLE.tp_shard(r, 3) for r in range(3))
    pages = _pages(WHOLE, 1)
    sa, sb, sc = (slice_heads(pages, WHOLE, s) for s in (a, b, c))
    with pytest.raises(KVLayoutMismatch, match=r"expected one starting at head 2, got heads \[4, 6\) of 6"):
        gather_heads([sa, sc], [a, c], WHOLE)  # a gap
    with pytest.raises(KVLayoutMismatch, match=r"slices end at head 4, heads \[0, 6\) of 6 ends at 6"):
        gather_heads([sa, sb], [a, b], WHOLE)  # short
    wide = WHOLE.with_heads(0, 3)
    with pytest.raises(KVLayoutMismatch, match="expected one starting at head 3"):
        gather_heads([slice_heads(pages, WHOLE, wide), sb, sc], [wide, b, c], WHOLE)  # overlap
    with pytest.raises(ValueError, match="slice 0 holds 2 heads, its layout says 3"):
        gather_heads([sa], [wide], WHOLE.with_heads(0, 3))
    with pytest.raises(ValueError, match="0 slices for 0 layouts"):
        gather_heads([], [], WHOLE)


def test_slicing_outside_the_source_or_across_models_is_refused() -> None:
    half = WHOLE.tp_shard(0, 2)  # heads [0, 3)
    with pytest.raises(
        KVLayoutMismatch, match=r"cannot cut heads \[2, 4\) of 6 out of pages holding heads \[0, 3\) of 6"
    ):
        slice_heads(_pages(half, 1), half, WHOLE.with_heads(2, 2))
    with pytest.raises(KVLayoutMismatch, match="share no head"):
        slice_heads(_pages(half, 1), half, WHOLE.tp_shard(1, 2))
    other = dataclasses.replace(WHOLE, head_dim=4)
    with pytest.raises(KVLayoutMismatch, match=r"beyond the head partition.*head_dim: 8 != 4"):
        slice_heads(_pages(WHOLE, 1), WHOLE, other.tp_shard(0, 2))
    with pytest.raises(ValueError, match=r"pages hold 3 heads, layout heads \[0, 6\) of 6 says 6"):
        slice_heads(_pages(half, 1), WHOLE, half)


def test_check_compatible_is_strict_and_names_both_partitions() -> None:
    WHOLE.check_compatible(KVLayout("float32", 4, 3, 6, 8, total_kv_heads=6))
    with pytest.raises(KVLayoutMismatch) as e:
        WHOLE.check_compatible(WHOLE.tp_shard(1, 2))
    assert "num_kv_heads: 6 != 3" in str(e.value) and "kv_head_start: 0 != 3" in str(e.value)
    assert "heads [0, 6) of 6 vs heads [3, 6) of 6" in str(e.value)
    # a different model (8 KV heads) is no resharding case: no partition hint
    with pytest.raises(KVLayoutMismatch) as e:
        WHOLE.tp_shard(0, 2).check_compatible(dataclasses.replace(WHOLE, num_kv_heads=8).tp_shard(0, 2))
    assert "total_kv_heads: 6 != 8" in str(e.value) and "only the head partition" not in str(e.value)
