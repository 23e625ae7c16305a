"""Torch SDPA over the paged cache: gather each sequence's pages, pad, mask, one SDPA call.

Sequences are split into a decode group (one query row each) and a prefill group (several
rows, e.g. a prompt chunk) so a long prompt does not pad every decode row to its length.
Everything that depends only on the step (row indices, page lists, the mask) is built once
per step in a ``_GroupPlan`` with vectorised tensor ops and reused by every layer.

On CPU the decode group skips the gather: the native paged kernel (engine/attention/cpu_paged.py)
reads each sequence's pages in place, once. SDPA stays the path for prefill groups, for caches
on other devices and wherever the native module cannot be built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import cpu_paged
from engine.attention.backend import AttentionMetadata
from engine.kv_cache.paged_cache import PagedKVCache


@dataclass
class _GroupPlan:
    rows: torch.Tensor  # [G, Qmax] int64 index into the T query rows (padding -> 0)
    valid: torch.Tensor  # [G, Qmax] bool: real query rows
    block_table: torch.Tensor  # [G, nblk] int64
    # [G, 1, Qmax, nblk * block_size] bool, True = attend; None when every row sees every key
    mask: torch.Tensor | None
    # [N] int64: the real rows of ``rows`` (row-major), i.e. ``rows[valid]``
    dst_rows: torch.Tensor
    # [N] int64: where those rows sit in the flattened [G * Qmax] padded layout
    src_rows: torch.Tensor
    # True when the padded layout IS the T query rows in order (no padding, no reordering):
    # then the output is a reshape of the SDPA result, no scatter.
    identity: bool
    # [G] int64 context length of each sequence; set for the decode group only (native kernel input)
    seq_lens: torch.Tensor | None = None


def build_group_plan(
    meta: AttentionMetadata, seqs: list[int], block_size: int, sliding_window: int | None, device
) -> _GroupPlan:
    """Padded index/mask tensors for sequences ``seqs`` of ``meta`` (shared by all layers)."""
    qsl = meta.query_start_loc
    qlens = [qsl[i + 1] - qsl[i] for i in seqs]
    lens = [meta.seq_lens[i] for i in seqs]
    q_max = max(qlens)
    nblk = -(-max(lens) // block_size)
    num_keys = nblk * block_size
    # Exactly the T query rows in order, no padding: the output is a reshape, no scatter.
    identity = seqs == list(range(meta.num_seqs)) and min(qlens) == q_max
    start = torch.tensor([qsl[i] for i in seqs], dtype=torch.long)  # [G]
    seq_len = torch.tensor(lens, dtype=torch.long)  # [G]
    keys = torch.arange(num_keys)
    if q_max == 1:  # decode group: one real row per sequence, at position seq_len - 1
        rows = start[:, None]
        valid = torch.ones((len(seqs), 1), dtype=torch.bool)
        src_rows, dst_rows = torch.arange(len(seqs)), start
        every_key = min(lens) == num_keys and (sliding_window is None or sliding_window >= num_keys)
        mask = None if every_key else keys[None, None, :] < seq_len[:, None, None]
        if mask is not None and sliding_window is not None:
            mask &= keys[None, None, :] > (seq_len - 1 - sliding_window)[:, None, None]
    else:
        qlen = torch.tensor(qlens, dtype=torch.long)  # [G]
        j = torch.arange(q_max)
        valid = j[None, :] < qlen[:, None]  # [G, Qmax]
        rows = torch.where(valid, start[:, None] + j[None, :], 0)
        qpos = seq_len[:, None] - qlen[:, None] + j[None, :]  # [G, Qmax] position of each query row
        mask = (keys[None, None, :] <= qpos[:, :, None]) & (keys[None, None, :] < seq_len[:, None, None])
        if sliding_window is not None:
            mask &= keys[None, None, :] > qpos[:, :, None] - sliding_window
        mask[~valid] = False
        mask[..., 0] |= ~valid  # padded rows attend to key 0 so softmax stays finite (output dropped)
        src_rows = valid.reshape(-1).nonzero().squeeze(1)
        dst_rows = rows.reshape(-1)[src_rows]
    table = meta.block_tables[seqs, :nblk]
    return _GroupPlan(
        rows=rows.to(device),
        valid=valid.to(device),
        block_table=table.to(device),
        mask=None if mask is None else mask[:, None].to(device),
        dst_rows=dst_rows.to(device),
        src_rows=src_rows.to(device),
        identity=identity,
        seq_lens=seq_len.to(device) if q_max == 1 else None,
    )


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache: [num_blocks, bs, Hkv, D] (any strides); block_table: [G, nblk] -> [G, Hkv, nblk * bs, D].

    One ``index_select`` into a contiguous [G * nblk, bs, Hkv, D] buffer, then views only.
    """
    g, nblk = block_table.shape
    pages = cache.index_select(0, block_table.reshape(-1))
    return pages.view(g, nblk * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


class TorchSDPABackend:
    """Reference attention backend: correct for any mix of prefill chunks and decodes.

    ``native_decode``: None (default) runs the decode group through the native CPU kernel when
    the cache is on CPU and the kernel builds; False never does; True requires it.
    """

    name = "sdpa"

    def __init__(self, cache: PagedKVCache, sliding_window: int | None = None, native_decode: bool | None = None):
        self.cache = cache
        self.sliding_window = sliding_window
        self._native = None if native_decode is False else cpu_paged.native_decode_module(cache.kv.device)
        if native_decode and self._native is None:
            raise RuntimeError("native_decode=True but the native CPU kernel is unavailable (see the log)")

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
        k_cache, v_cache = self.cache.layer(layer)  # [num_blocks, bs, Hkv, D]
        if self._native is not None and k.is_contiguous() and v.is_contiguous():
            self._native.write_kv(k_cache, v_cache, meta.slot_mapping, k, v)  # PagedKVCache.write, one call
        else:
            self.cache.write(layer, meta.slot_mapping, k, v)
        plans = self._plans(meta)
        if len(plans) == 1 and plans[0].identity:
            return self._attend(plans[0], q, k_cache, v_cache).reshape(q.shape)
        out = torch.empty_like(q)
        for p in plans:
            o = self._attend(p, q, k_cache, v_cache)  # [G, Qmax, H, D]
            out[p.dst_rows] = o.reshape(-1, *q.shape[1:])[p.src_rows]
        return out

    def _attend(self, p: _GroupPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Attention of the group's padded query rows -> [G, Qmax, H, D] (padded rows are junk)."""
        if p.seq_lens is not None and self._native is not None:  # decode group: Qmax == 1, no padding
            qq = q if p.identity else q[p.dst_rows]  # [G, H, D]
            o = cpu_paged.paged_decode(
                self._native, qq, k_cache, v_cache, p.block_table, p.seq_lens, self.sliding_window
            )
            return o[:, None]
        kk, vv = gather_pages(k_cache, p.block_table), gather_pages(v_cache, p.block_table)  # [G, Hkv, L, D]
        qq = q[p.rows].transpose(1, 2)  # [G, H, Qmax, D]
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=p.mask, enable_gqa=True)
        return o.transpose(1, 2)
