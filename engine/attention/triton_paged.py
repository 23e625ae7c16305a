"""Triton paged decode attention (one query row per sequence) and the backend that uses it.

Kernel layout: one program per (sequence, kv head[, split]). The program loads the
``GROUP = H // Hkv`` query heads that share that kv head as one ``[GROUP_PAD, D_PAD]`` tile,
so each K/V page is read once per group (GQA/MQA friendly), and walks the sequence's keys
in tiles of ``BLOCK_N`` with an online softmax accumulated in fp32.

Split-K (flash-decoding): with ``num_splits > 1`` each program covers a contiguous slice of
the key tiles and writes a partial result (normalised output + log-sum-exp);
a small reduction kernel then merges the splits. Used when B * Hkv programs would leave
most SMs idle on long contexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.attention.backend import AttentionMetadata
from engine.attention.sdpa import TorchSDPABackend, _GroupPlan, build_group_plan

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    scale_log2,  # softmax scale * log2(e): scores live in base-2 units, so exp2 == exp
    window,  # sliding window (only read when HAS_WINDOW)
    stride_qb, stride_qh, stride_qd,  # q: [B, H, D]
    stride_kb, stride_kt, stride_kh, stride_kd,  # k_cache: [num_blocks, BLOCK_SIZE, Hkv, D]
    stride_vb, stride_vt, stride_vh, stride_vd,  # v_cache: same shape, own strides
    stride_btb,  # block_tables: [B, max_blocks] (unit stride along blocks)
    stride_ob, stride_oh, stride_os,  # out: [B, H, NUM_SPLITS, D] (unit stride along D)
    stride_lb, stride_lh,  # lse: [B, H, NUM_SPLITS] (unit stride along splits)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    pos = seq_len - 1  # the query's position; visible keys are [lo, seq_len)
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    else:
        lo = seq_len * 0
    # Key tiles [tile_lo, tile_hi) cover [lo, seq_len); every tile holds >= 1 visible key.
    tile_lo = lo // BLOCK_N
    tile_hi = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
    t_start = tile_lo + split * per_split
    t_end = tl.minimum(t_start + per_split, tile_hi)  # may be empty for a short sequence

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    n = tl.arange(0, BLOCK_N)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    # q: [GROUP_PAD, HEAD_DIM_PAD]; padded rows/columns are 0 (finite scores, output dropped).
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # Online-softmax invariants after each tile, per query row:
    #   m_i = max score seen so far (base 2), l_i = sum_j 2^(s_j - m_i),
    #   acc = sum_j 2^(s_j - m_i) * v_j   -> final output is acc / l_i.
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for t in range(t_start, t_end):
        keys = t * BLOCK_N + n  # [BLOCK_N] token positions
        k_ok = (keys >= lo) & (keys < seq_len)
        blk = tl.load(bt_ptr + b * stride_btb + keys // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        off = keys % BLOCK_SIZE
        kv_ok = k_ok[:, None] & d_ok[None, :]
        # k, v: [BLOCK_N, HEAD_DIM_PAD] gathered token by token from their pages
        k = tl.load(
            k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_kt + kvh * stride_kh + d[None, :] * stride_kd,
            mask=kv_ok,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the tile has a visible key
        alpha = tl.exp2(m_i - m_new)  # rescales the old state; 0 on the first tile
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh + d[None, :] * stride_vd,
            mask=kv_ok,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0  # False only for an empty split
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,  # part: [B, H, NUM_SPLITS, D] fp32 (unit stride along D)
    stride_lb, stride_lh,  # lse: [B, H, NUM_SPLITS] base-2 log-sum-exp, -inf for empty splits
    stride_ob, stride_oh,  # out: [B, H, D] (unit stride along D)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    # out = sum_s w_s * part_s / sum_s w_s with w_s = 2^(lse_s - max lse); split 0 always has keys.
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # [SPLITS_PAD], 0 for empty/padded splits
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=s_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    o = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# False when TRITON_INTERPRET=1 was set before this module was imported (kernels run on CPU).
_COMPILED = isinstance(_paged_decode_kernel, triton.runtime.JITFunction)


def default_num_splits(batch: int, num_kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Split-K factor: enough programs to fill the GPU, >= 256 keys per split, 1 on CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * num_kv_heads
    return max(1, min(sms // max(programs, 1), triton.cdiv(max_keys, 256), 32))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over paged K/V: q is the last token (position seq_len-1) of each row.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (any strides);
    block_tables: [B, max_blocks] int; seq_lens: [B] int, each >= 1 -> out: [B, H, D].
    Key j of row b is visible iff j < seq_lens[b] and (no window or j > pos - window).
    """
    bsz, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kd = k_cache.shape
    if v_cache.shape != k_cache.shape or kd != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} / q {tuple(q.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two")
    if block_tables.shape[0] != bsz or seq_lens.shape != (bsz,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} vs B={bsz}")
    if _COMPILED and not q.is_cuda:
        raise RuntimeError("paged_decode_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    group = num_heads // num_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if d_pad <= 128 else 32  # >= 16 for tl.dot
    if num_splits is None:
        num_splits = default_num_splits(bsz, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    out = torch.empty((bsz, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if num_splits == 1:
        part, lse = out.unsqueeze(2), out  # kernel writes the final output; lse unused
    else:
        part = torch.empty((bsz, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((bsz, num_heads, num_splits), dtype=torch.float32, device=q.device)
    # fmt: off
    _paged_decode_kernel[(bsz, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        scale * _LOG2E, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        *part.stride()[:3], *lse.stride()[:2],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if num_splits > 1:
        _merge_splits_kernel[(bsz, num_heads)](
            part, lse, out, *part.stride()[:3], *lse.stride()[:2], *out.stride()[:2],
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        )
    # fmt: on
    return out


@dataclass
class _TritonPlan:
    """Per-step tensors shared by every layer (lives in ``meta.plans["triton"]``)."""

    prefill: list[_GroupPlan]  # SDPA plan for sequences with several query rows (or [])
    rows: torch.Tensor | None  # [Bd] int64 query row of each decode sequence; None if no decodes
    block_tables: torch.Tensor  # [Bd, nblk] int32, nblk = max pages any decode sequence uses
    seq_lens: torch.Tensor  # [Bd] int32
    num_splits: int


class TritonPagedBackend(TorchSDPABackend):
    """Decode rows (query length 1) go through the Triton kernel; prefill chunks through SDPA.

    Reuses TorchSDPABackend.forward for the cache write and the prefill group by overriding
    its ``_plans`` hook to return only the prefill plan; decode rows are filled in afterwards.
    """

    name = "triton"  # also its key in meta.plans; constructor is TorchSDPABackend's (cache, sliding_window)

    def _plan(self, meta: AttentionMetadata) -> _TritonPlan:
        plan = meta.plans.get(self.name)
        if plan is None:
            qlens = meta.query_lens
            dev, bs = self.cache.kv.device, self.cache.layout.block_size
            decode = [i for i, n in enumerate(qlens) if n == 1]
            prefill = [i for i, n in enumerate(qlens) if n > 1]
            prefill_plans = [build_group_plan(meta, prefill, bs, self.sliding_window, dev)] if prefill else []
            nblk = max((-(-meta.seq_lens[i] // bs) for i in decode), default=0)
            table = meta.block_tables[decode, :nblk].to(device=dev, dtype=torch.int32)
            lens = torch.tensor([meta.seq_lens[i] for i in decode], dtype=torch.int32, device=dev)
            rows = torch.tensor([meta.query_start_loc[i] for i in decode], dtype=torch.long, device=dev)
            splits = default_num_splits(len(decode), self.cache.layout.num_kv_heads, nblk * bs, dev)
            plan = _TritonPlan(prefill_plans, rows if decode else None, table, lens, splits)
            meta.plans[self.name] = plan
        return plan

    def _plans(self, meta: AttentionMetadata) -> list[_GroupPlan]:
        return self._plan(meta).prefill  # the SDPA part of forward only sees the prefill group

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D]. super() writes k/v into the cache and fills prefill rows.
        out = super().forward(layer, q, k, v, meta)
        plan = self._plan(meta)
        if plan.rows is not None:
            k_cache, v_cache = self.cache.layer(layer)  # [num_blocks, bs, Hkv, D] strided views
            out[plan.rows] = paged_decode_attention(
                q[plan.rows],
                k_cache,
                v_cache,
                plan.block_tables,
                plan.seq_lens,
                1.0 / math.sqrt(q.shape[-1]),
                self.sliding_window,
                plan.num_splits,
            )
        return out
