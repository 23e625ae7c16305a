"""The head-splitting page sink of a tensor-parallel decode worker: it receives whole pages.

Workers exchange whole-head pages (``KVLayout.whole()``: every KV head of the model), whatever
their TP degrees; the cut happens here, at the TP worker's edge. The worker's KV receiver is
built over a ``TPPageSink`` instead of rank 0's PagedKVCache: the sink's layout is the whole
layout (what the handshake shows the prefill worker), and each verified run of pages
``[n, 2, block_size, H_kv, D]`` is cut along the head axis (engine/kv_cache/reshard.py):
rank 0's heads are written into rank 0's cache at once, rank r's are sent to follower r as a
``WriteKV`` call (an owned copy: the receiver's buffer is reused).

Order (the SPMD invariant, engine/runtime/tensor_parallel.py): WriteKV calls come from the
receiver's transport thread (or rank 0's loop thread, replaying chunks buffered before
``expect``), not from the loop, yet every follower still sees them where rank 0 does:

- after the request's Reserve: the receiver writes a request's pages only once ``expect``
  named its blocks, and the decode worker calls ``expect`` after ``engine.reserve``
  returned, i.e. after Reserve was queued to every follower;
- before its Admit: the receiver reports DONE only after the last page is written (and its
  WriteKV queued), under its lock, and the worker admits only after it polled DONE;
- before a Release/Abort of the request's blocks: the worker cancels the transfer first
  (``receiver.cancel`` takes the same lock the write holds: nothing lands after it returns).

Between those calls a follower may interleave WriteKV with Steps freely: a reserved,
unadmitted request's blocks are read by no step.
"""

from __future__ import annotations

import torch

from engine.engine import EngineCore
from engine.kv_cache.reshard import slice_heads
from engine.runtime.tensor_parallel import TPFollowerLink, WriteKV


class TPPageSink:
    """Whole pages in, each rank's heads out (module docstring). A kv_transfer ``PageSink``:
    ``layout``, ``num_blocks``, ``write_pages`` and ``kv`` (rank 0's cache, read for its device
    only: the torch.distributed transport picks gloo or NCCL by it)."""

    def __init__(self, core: EngineCore, followers: list[TPFollowerLink]):
        self.core = core
        self.followers = followers
        self.layout = core.layout.whole()  # what this worker receives: every KV head
        world = len(followers) + 1
        self.rank_layouts = [self.layout.tp_shard(r, world) for r in range(world)]
        if self.rank_layouts[0] != core.layout:
            raise ValueError(
                f"rank 0 holds {core.layout.partition_str()}, its contiguous TP share is "
                f"{self.rank_layouts[0].partition_str()}"
            )

    @property
    def kv(self) -> torch.Tensor:
        return self.core.cache.kv

    @property
    def num_blocks(self) -> int:
        return self.core.cache.num_blocks  # every rank's pool has as many blocks

    def write_pages(self, layer: int, block_ids: list[int], pages: torch.Tensor) -> None:
        """``pages: [len(block_ids), 2, block_size, H_kv, D]`` (whole heads) -> rank r's heads
        into rank r's blocks ``block_ids`` (the same ids on every rank: same pool state)."""
        for f, lay in zip(self.followers, self.rank_layouts[1:], strict=True):
            f.submit(WriteKV(layer, tuple(block_ids), slice_heads(pages, self.layout, lay).clone()))
        self.core.cache.write_pages(layer, block_ids, slice_heads(pages, self.layout, self.rank_layouts[0]))
