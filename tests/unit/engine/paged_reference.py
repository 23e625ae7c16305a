"""Shared by the paged decode-attention kernel tests (native CPU and Triton): random paged
caches, shuffled block tables and a float64 reference of decode attention."""

import math

import torch

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache


def random_cache(bs, hkv, d, num_blocks, layers=2, dtype="float32", device="cpu", seed=0) -> PagedKVCache:
    torch.manual_seed(seed)
    layout = KVLayout(dtype=dtype, block_size=bs, num_layers=layers, num_kv_heads=hkv, head_dim=d)
    cache = PagedKVCache(layout, num_blocks, device=device)
    cache.kv.normal_()
    return cache


def block_tables(lens, bs, num_blocks, seed=1) -> torch.Tensor:
    """[B, max_blocks + 2] int64 tables over shuffled block ids (no block shared), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    need = [-(-n // bs) for n in lens]
    assert sum(need) <= num_blocks
    table = torch.zeros((len(lens), max(need) + 2), dtype=torch.long)  # +2: unused padding
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    return table


def reference_decode(q, k_cache, v_cache, table, lens, window=None) -> torch.Tensor:
    """float64 gather + softmax(q k^T / sqrt(D)) v at the last position of each row, on CPU.
    q: [B, H, D]; k_cache, v_cache: [num_blocks, bs, Hkv, D] -> [B, H, D] float64."""
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    out = torch.empty((b, h, d), dtype=torch.float64)
    for i, n in enumerate(lens):
        blocks = table[i, : -(-n // bs)].cpu()
        kk = k_cache[blocks].reshape(-1, hkv, d)[:n].double().repeat_interleave(h // hkv, 1)
        vv = v_cache[blocks].reshape(-1, hkv, d)[:n].double().repeat_interleave(h // hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[i].cpu().double(), kk) / math.sqrt(d)
        if window is not None:
            s[:, torch.arange(n) <= n - 1 - window] = float("-inf")
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), vv)
    return out
