"""Torch SDPA over the paged cache: gather each sequence's pages, pad, mask, one SDPA call.

Sequences are split into a decode group (one query row each) and a prefill group (several
rows, e.g. a prompt chunk) so a long prompt does not pad every decode row to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionMetadata
from engine.kv_cache.paged_cache import PagedKVCache


@dataclass
class _GroupPlan:
    rows: torch.Tensor  # [G, Qmax] int64 index into the T query rows (padding -> 0)
    valid: torch.Tensor  # [G, Qmax] bool: real query rows
    block_table: torch.Tensor  # [G, nblk] int64
    mask: torch.Tensor  # [G, 1, Qmax, nblk * block_size] bool: True = attend


def build_group_plan(
    meta: AttentionMetadata, seqs: list[int], block_size: int, sliding_window: int | None, device
) -> _GroupPlan:
    """Padded index/mask tensors for sequences ``seqs`` of ``meta`` (shared by all layers)."""
    qlens = meta.query_lens
    q_max = max(qlens[i] for i in seqs)
    nblk = max(-(-meta.seq_lens[i] // block_size) for i in seqs)
    g = len(seqs)
    rows = torch.zeros((g, q_max), dtype=torch.long)
    valid = torch.zeros((g, q_max), dtype=torch.bool)
    qpos = torch.zeros((g, q_max), dtype=torch.long)
    seq_len = torch.tensor([meta.seq_lens[i] for i in seqs], dtype=torch.long)
    for j, i in enumerate(seqs):
        n = qlens[i]
        start = meta.query_start_loc[i]
        rows[j, :n] = torch.arange(start, start + n)
        valid[j, :n] = True
        qpos[j, :n] = torch.arange(meta.seq_lens[i] - n, meta.seq_lens[i])
    keys = torch.arange(nblk * block_size)
    mask = (keys[None, None, :] <= qpos[:, :, None]) & (keys[None, None, :] < seq_len[:, None, None])
    if sliding_window is not None:
        mask &= keys[None, None, :] > qpos[:, :, None] - sliding_window
    mask[~valid] = False
    mask[..., 0] |= ~valid  # padded rows attend to key 0 so softmax stays finite (output dropped)
    table = meta.block_tables[seqs, :nblk]
    return _GroupPlan(rows.to(device), valid.to(device), table.to(device), mask[:, None].to(device))


class TorchSDPABackend:
    """Reference attention backend: correct for any mix of prefill chunks and decodes."""

    name = "sdpa"

    def __init__(self, cache: PagedKVCache, sliding_window: int | None = None):
        self.cache = cache
        self.sliding_window = sliding_window

    def _plans(self, meta: AttentionMetadata) -> list[_GroupPlan]:
        plans = meta.plans.get(self.name)
        if plans is None:
            qlens = meta.query_lens
            groups = [[i for i, n in enumerate(qlens) if n == 1], [i for i, n in enumerate(qlens) if n > 1]]
            bs, dev = self.cache.layout.block_size, self.cache.kv.device
            plans = [build_group_plan(meta, g, bs, self.sliding_window, dev) for g in groups if g]
            meta.plans[self.name] = plans
        return plans

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D]
        self.cache.write(layer, meta.slot_mapping, k, v)
        k_cache, v_cache = self.cache.layer(layer)  # [num_blocks, bs, Hkv, D]
        out = torch.empty_like(q)
        for p in self._plans(meta):
            g, nblk = p.block_table.shape
            # keys: [G, Hkv, nblk * bs, D]
            kk = k_cache[p.block_table].reshape(g, -1, *k_cache.shape[2:]).transpose(1, 2)
            vv = v_cache[p.block_table].reshape(g, -1, *v_cache.shape[2:]).transpose(1, 2)
            qq = q[p.rows].transpose(1, 2)  # [G, H, Qmax, D]
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=p.mask, enable_gqa=True)
            out[p.rows[p.valid]] = o.transpose(1, 2)[p.valid]
        return out
