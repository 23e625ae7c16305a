"""TPPageSink, a TP decode worker's receiver sink: whole pages in, rank 0's heads written into
its cache, rank r's sent to follower r as a WriteKV call that owns its tensor (it survives the
receiver reusing its buffer, and pickles: a remote follower can take it)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

from decode_worker.tp_kv_receiver import TPPageSink
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from engine.runtime.tensor_parallel import WriteKV

WHOLE = KVLayout("float32", block_size=2, num_layers=2, num_kv_heads=6, head_dim=4)


class RecordingFollower:
    def __init__(self, name: str):
        self.name = name
        self.calls: list[WriteKV] = []

    def submit(self, call: WriteKV) -> None:
        self.calls.append(call)

    def failure(self, wait_s: float = 0.0) -> str | None:
        return None


def test_whole_pages_are_cut_by_head_for_every_rank() -> None:
    rank0 = PagedKVCache(WHOLE.tp_shard(0, 3), 5)
    followers = [RecordingFollower("r1"), RecordingFollower("r2")]
    sink = TPPageSink(SimpleNamespace(layout=rank0.layout, cache=rank0), followers)  # type: ignore[arg-type]
    assert sink.layout == WHOLE and sink.num_blocks == 5
    buffer = torch.randn(2, *WHOLE.page_shape)  # [n, 2, bs, 6, D]: a receiver's (reused) buffer
    sink.write_pages(1, [4, 2], buffer)
    want = buffer.clone()
    buffer.zero_()  # the receiver reuses its buffer: the calls must own their pages
    assert torch.equal(rank0.kv[1, [4, 2]], want[..., 0:2, :])
    for r, f in enumerate(followers, start=1):
        (call,) = f.calls
        assert (call.layer, call.block_ids) == (1, (4, 2))
        assert torch.equal(call.pages, want[..., 2 * r : 2 * r + 2, :])
        again = pickle.loads(pickle.dumps(call))  # plain values and a tensor: sendable to another process
        assert again.block_ids == call.block_ids and torch.equal(again.pages, call.pages)


def test_a_rank_0_cache_that_is_not_the_first_share_is_refused() -> None:
    cache = PagedKVCache(WHOLE.tp_shard(1, 2), 3)
    with pytest.raises(
        ValueError, match=r"rank 0 holds heads \[3, 6\) of 6, its contiguous TP share is heads \[0, 3\)"
    ):
        TPPageSink(SimpleNamespace(layout=cache.layout, cache=cache), [RecordingFollower("r1")])  # type: ignore[arg-type]
