"""AttentionBackend protocol and the per-step AttentionMetadata every backend reads.

The model calls ``backend.forward(layer, q, k, v, meta)`` once per layer. A local backend
stores k/v into the paged cache at ``meta.slot_mapping`` and attends over the pages in
``meta.block_tables``; a remote backend (attention_offload) ships q/k/v elsewhere.

The split form: ``submit(layer, q, k, v, meta)`` issues the attention and returns a
``Pending`` (engine/parallel.py) whose ``wait()`` yields the output; ``forward`` means
``submit(...).wait()``. A backend that only has ``forward`` (every local one) is adapted by
``split_backend`` (``EagerSubmit``: submit computes at once). ``rotation`` is how many
micro-batches the model's layer loop should rotate through it (1: the plain sequential path):
a remote backend asks for 2 so one micro-batch's dense part runs while the other's attention
is away (Lamina). The model reads only these two names; it never knows attention is remote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from engine.parallel import Pending, Ready


@dataclass
class AttentionMetadata:
    """Describes one step's flattened batch of B sequences and T new tokens.

    Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` of q. Its
    ``seq_lens[i]`` tokens of context (cached + new) live in pages ``block_tables[i]``;
    the new tokens sit at the end, so query row r of sequence i has position
    ``seq_lens[i] - q_len_i + r`` and sees keys ``0..position`` (causal).
    """

    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token
    query_start_loc: list[int]  # [B+1]
    seq_lens: list[int]  # [B]
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    # [B] the request of each sequence (engine request ids); empty when the caller has none
    # (a remote backend needs them: it keys the KV it keeps elsewhere by request)
    request_ids: list[str] = field(default_factory=list)
    # (index, count): this metadata is micro-batch ``index`` of the ``count`` the step was cut
    # into (``select``); the layer loop submits layer l of micro-batches 0..count-1 in order,
    # then layer l + 1. (0, 1) for a step that is not cut.
    micro_batch: tuple[int, int] = (0, 1)
    # Free-form per-backend plans computed once per step and reused by every layer.
    plans: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]

    def select(self, first: int, end: int, micro_batch: tuple[int, int] = (0, 1)) -> tuple[int, int, AttentionMetadata]:
        """The metadata of sequences [first, end) alone, as micro-batch ``micro_batch`` ->
        (first query row, end query row, metadata with rows renumbered from 0, no plans)."""
        if not 0 <= first < end <= self.num_seqs:
            raise ValueError(f"select: sequences [{first}, {end}) outside [0, {self.num_seqs})")
        r0, r1 = self.query_start_loc[first], self.query_start_loc[end]
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[r0:r1],
            query_start_loc=[q - r0 for q in self.query_start_loc[first : end + 1]],
            seq_lens=self.seq_lens[first:end],
            block_tables=self.block_tables[first:end],
            request_ids=self.request_ids[first:end],
            micro_batch=micro_batch,
        )
        return r0, r1, meta


@runtime_checkable
class AttentionBackend(Protocol):
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the new tokens -> output [T, H, D]."""
        ...


@runtime_checkable
class SplitAttentionBackend(Protocol):
    """An AttentionBackend with the split form (see the module docstring)."""

    rotation: int  # micro-batches the layer loop rotates through this backend (>= 1)

    def submit(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> Pending[torch.Tensor]:
        """Issue the attention of q: [T, H, D] with the new k/v: [T, Hkv, D]; the Pending
        yields [T, H, D]. Submits of one step must be waited in submission order per layer."""
        ...

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...


class EagerSubmit:
    """The default adapter: a forward-only backend as a SplitAttentionBackend. ``submit``
    runs ``forward`` at once and returns a Ready; ``rotation`` is 1 (nothing to overlap)."""

    rotation = 1

    def __init__(self, backend: AttentionBackend):
        self.backend = backend

    def submit(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> Pending[torch.Tensor]:
        return Ready(self.backend.forward(layer, q, k, v, meta))

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.backend.forward(layer, q, k, v, meta)


@runtime_checkable
class RemoteKVBackend(Protocol):
    """A backend that keeps every request's K/V elsewhere (attention offload's shards). The
    engine then allocates no local pages (a one-block placeholder cache: its block pool
    accounts for the remote pages, which are addressed by the engine's block ids).

    The remote K/V lives in ``kv_partitions`` separate stores (block counts; a request whole in
    one): the engine's pool is partitioned the same way (engine/kv_cache/partitioned.py:
    partition p is block ids [sum of the sizes before p, + kv_partitions[p])), it chooses each
    request's store at its first allocation, and a full store is the scheduler's ordinary "no
    free block" (preempt or wait), never a failure inside the step. The backend reads each
    request's store and pages off the step's block tables; the engine tells it nothing when a
    request's blocks are freed (the store reuses a page only when the engine hands the block
    out again, whose new owner writes it before reading it)."""

    keeps_kv_remotely: bool  # True
    kv_partitions: list[int]  # blocks of each remote store, in the engine's block size


def split_backend(backend: AttentionBackend) -> SplitAttentionBackend:
    """``backend`` itself when it has the split form, else wrapped in ``EagerSubmit``."""
    if isinstance(backend, SplitAttentionBackend):
        return backend
    return EagerSubmit(backend)
