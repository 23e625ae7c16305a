"""AttentionBackend protocol and the per-step AttentionMetadata every backend reads.

The model calls ``backend.forward(layer, q, k, v, meta)`` once per layer. A local backend
stores k/v into the paged cache at ``meta.slot_mapping`` and attends over the pages in
``meta.block_tables``; a remote backend (attention_offload) ships q/k/v elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


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
    # Free-form per-backend plans computed once per step and reused by every layer.
    plans: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]


@runtime_checkable
class AttentionBackend(Protocol):
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the new tokens -> output [T, H, D]."""
        ...
