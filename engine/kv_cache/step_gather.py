"""A tensor-parallel step's new KV pages, all-gathered over the TP group inside the step.

A TP prefill worker pushes whole-head pages (every rank's KV heads) layer by layer. Gathering
them after the step puts one all-gather of every layer on the critical path between steps.
On a TokenWeave step ``StepKVGather`` instead issues layer l's all-gather, asynchronously, as
soon as layer l's KV is written on this rank (the model's ``kv_hook``, after the attention of
the last token micro-batch). The gather then runs while layer l + 1 computes, the token-split
overlap TokenWeave gives the all-reduces, and ``finish`` waits for them at the end of the step:
only the last layer's gather is exposed. A step below TokenWeave's threshold never calls the
hook (the sequential path has no overlap to join, and per-layer gathers measured slower there
than one: BENCHMARKS.md), so ``finish`` gathers every layer in one collective.

SPMD: every rank builds the same ``StepKVGather`` from the same SchedulerOutput's
``written_blocks`` (every rank schedules alike, engine/engine.py) and the model calls ``layer_written`` at the same points on
every rank, so the collectives pair by issue order with each other and with the step's
all-reduces. The blocks are a superset of what the worker sends: every block a scheduled
request's new tokens touch (``sr.block_ids[start_pos // bs : (end - 1) // bs + 1]``), in
schedule order, each once. Pages outside it (a preempted request resent from page 0) are not
here: ``StepKVPages.pages`` returns None and the worker gathers them the old way.

Shapes: this rank's pages of a layer ``[n, 2, block_size, Hkv_local, D]``; gathered
``[W, n, ...]``; whole pages ``[n, 2, block_size, Hkv, D]`` (heads in model order).
Lifecycle: built by EngineCore.step for one step, ``finish``ed before the step returns; the
``StepKVPages`` it returns is read by the worker after the step, before the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from engine.kv_cache.reshard import gather_heads
from engine.parallel import Communicator, Pending


@dataclass
class StepKVPages:
    """The step's gathered pages: ``per_layer[l]`` is ``[W, n, 2, block_size, Hkv_local, D]``
    (rank r's heads at row r) for ``block_ids`` (n of them)."""

    block_ids: tuple[int, ...]
    per_layer: list[torch.Tensor]
    layouts: list[KVLayout]  # rank r's head slice
    whole: KVLayout
    _row: dict[int, int] = field(default_factory=dict)
    _whole: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._row = {b: i for i, b in enumerate(self.block_ids)}

    def pages(self, layer: int, blocks: list[int]) -> torch.Tensor | None:
        """Whole pages of ``blocks`` at ``layer``: [len(blocks), 2, block_size, Hkv, D], or None
        when a block was not written by this step. A view of this object's own tensor when the
        blocks are consecutive here (a request's pages of one step), else a copy; never a view
        of the cache, so later steps cannot change it."""
        rows = [self._row.get(b) for b in blocks]
        if any(r is None for r in rows):
            return None
        whole = self._whole.get(layer)
        if whole is None:
            whole = self._whole[layer] = gather_heads(list(self.per_layer[layer].unbind(0)), self.layouts, self.whole)
        first = rows[0]
        if rows == list(range(first, first + len(rows))):
            return whole[first : first + len(rows)]
        return whole[torch.tensor(rows, dtype=torch.long)]  # advanced index: a copy


class StepKVGather:
    """One step's in-step gathers (module docstring)."""

    def __init__(self, cache: PagedKVCache, comm: Communicator, block_ids: tuple[int, ...]):
        """``block_ids``: the step's written blocks (SchedulerOutput.written_blocks), the same
        on every rank."""
        self.cache, self.comm = cache, comm
        self.block_ids = block_ids
        self._index = torch.tensor(self.block_ids, dtype=torch.long, device=cache.kv.device)
        self._pending: list[Pending[torch.Tensor] | None] = [None] * cache.layout.num_layers

    def layer_written(self, layer: int) -> None:
        """Layer ``layer``'s KV of the step is in this rank's cache: start its all-gather."""
        if self._pending[layer] is not None:
            raise RuntimeError(f"layer {layer}'s KV gathered twice in one step")
        mine = self.cache.kv[layer, self._index].unsqueeze(0)  # [1, n, 2, bs, h, D], a copy
        self._pending[layer] = self.comm.all_gather_async(mine)

    @property
    def overlapped(self) -> bool:
        """Whether the step issued its gathers layer by layer (the TokenWeave path)."""
        return any(p is not None for p in self._pending)

    def finish(self) -> StepKVPages:
        """Wait for every layer's gather, or gather every layer now when the step issued none
        (raises CommunicationError like any collective)."""
        if not self.overlapped:  # one collective: [1, L, n, ...] -> [W, L, n, ...]
            got = self.comm.all_gather(self.cache.kv[:, self._index].unsqueeze(0))
            per_layer = list(got.unbind(1))  # [W, n, 2, bs, h, D] each
        else:
            missing = [layer for layer, p in enumerate(self._pending) if p is None]
            if missing:
                raise RuntimeError(f"the step gathered some layers but not {missing}: kv_hook missed them")
            per_layer = [p.wait() for p in self._pending]  # type: ignore[union-attr]
        w = self.comm.world_size
        whole = self.cache.layout.whole()
        return StepKVPages(self.block_ids, per_layer, [whole.tp_shard(r, w) for r in range(w)], whole)
