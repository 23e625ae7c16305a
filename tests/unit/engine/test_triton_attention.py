"""Triton paged decode attention vs a float64 reference and vs TorchSDPABackend.

Without CUDA the kernels run in Triton's interpreter on CPU (TRITON_INTERPRET must be set
before triton is first imported), so these shapes stay small.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from engine.attention.backend import AttentionMetadata  # noqa: E402
from engine.attention.sdpa import TorchSDPABackend  # noqa: E402
from engine.attention.triton_paged import TritonPagedBackend, paged_decode_attention  # noqa: E402
from tests.unit.engine.paged_reference import block_tables as _tables  # noqa: E402
from tests.unit.engine.paged_reference import random_cache  # noqa: E402
from tests.unit.engine.paged_reference import reference_decode as _reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [1, 13, 16, 37, 70]  # one token, partial page, exactly one/two pages, several pages


def _cache(bs, hkv, d, num_blocks=48, **kw):
    return random_cache(bs, hkv, d, num_blocks, **{"device": DEVICE, **kw})


def _run(h, hkv, d, bs, lens=LENS, window=None, num_splits=None, layer=1):
    cache = _cache(bs, hkv, d)
    k_cache, v_cache = cache.layer(layer)
    assert not k_cache.is_contiguous()  # strided views of kv[layer, :, 0]
    table = _tables(lens, bs, cache.num_blocks)
    q = torch.randn(len(lens), h, d, device=DEVICE)
    out = paged_decode_attention(
        q, k_cache, v_cache, table.to(DEVICE), torch.tensor(lens, device=DEVICE), 1 / math.sqrt(d), window, num_splits
    )
    return out, _reference(q, k_cache, v_cache, table, lens, window)


@pytest.mark.parametrize("bs", [8, 16])
@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (4, 1)])
def test_kernel_matches_reference(h, hkv, d, bs):
    out, ref = _run(h, hkv, d, bs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16, 200])
def test_kernel_sliding_window(window):
    out, ref = _run(6, 2, 80, 8, window=window)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits,window", [(2, None), (3, None), (8, None), (3, 20)])
def test_kernel_split_k(num_splits, window):
    # seq len 1 with 8 splits leaves most splits empty; the merge must ignore them.
    out, ref = _run(8, 2, 48, 8, window=window, num_splits=num_splits)
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-5)


def test_kernel_strided_q_separate_kv_strides_int32_indices():
    cache = _cache(16, 2, 64)
    k_cache, v_cache = cache.layer(0)
    v_cache = v_cache.contiguous()  # K and V with different strides
    assert k_cache.stride() != v_cache.stride()
    lens = [5, 33]
    table = _tables(lens, 16, cache.num_blocks)
    q = torch.randn(4, 2, 64, device=DEVICE).transpose(0, 1)  # [B=2, H=4, D] non-contiguous
    out = paged_decode_attention(
        q,
        k_cache,
        v_cache,
        table.to(DEVICE, torch.int32),
        torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        0.125,
    )
    torch.testing.assert_close(out.cpu().double(), _reference(q, k_cache, v_cache, table, lens), atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_shapes():
    cache = _cache(8, 3, 16)
    k_cache, v_cache = cache.layer(0)
    table, lens = torch.zeros((1, 2), dtype=torch.long), torch.tensor([3])
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 4, 16), k_cache, v_cache, table, lens, 0.25)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(torch.randn(1, 6, 16), k_cache, v_cache, table, lens, 0.25, sliding_window=0)
    bad = _cache(6, 1, 16)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(torch.randn(1, 2, 16), *bad.layer(0), table, lens, 0.25)


def _mixed_step(bs, num_blocks, seq_lens, query_lens, seed=2):
    """Metadata for one step whose new tokens are the last query_lens[i] of each sequence."""
    table = _tables(seq_lens, bs, num_blocks, seed=seed)
    slots, starts = [], [0]
    for i, (n, qn) in enumerate(zip(seq_lens, query_lens)):
        slots += [int(table[i, p // bs]) * bs + p % bs for p in range(n - qn, n)]
        starts.append(starts[-1] + qn)
    return table, starts, torch.tensor(slots, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("query_lens", [[1, 1, 9, 1, 4], [1, 1, 1, 1, 1], [3, 2, 9, 5, 4]])
def test_backend_matches_sdpa(query_lens, window):
    h, hkv, d, bs = 4, 2, 48, 8
    seq_lens = [12, 1, 30, 57, 4]
    ref_cache, tri_cache = _cache(bs, hkv, d), _cache(bs, hkv, d)
    assert torch.equal(ref_cache.kv, tri_cache.kv)
    table, starts, slots = _mixed_step(bs, ref_cache.num_blocks, seq_lens, query_lens)
    ref_be, tri_be = TorchSDPABackend(ref_cache, window), TritonPagedBackend(tri_cache, window)
    assert tri_be.name == "triton"
    ref_meta = AttentionMetadata(slots, starts, seq_lens, table)
    tri_meta = AttentionMetadata(slots, starts, seq_lens, table)
    t = starts[-1]
    for layer in range(2):
        q = torch.randn(t, h, d, device=DEVICE)
        k, v = torch.randn(t, hkv, d, device=DEVICE), torch.randn(t, hkv, d, device=DEVICE)
        ref = ref_be.forward(layer, q, k, v, ref_meta)
        out = tri_be.forward(layer, q, k, v, tri_meta)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        if layer == 0:
            plan = tri_meta.plans["triton"]
        assert tri_meta.plans["triton"] is plan  # built once per step, reused by every layer
    torch.testing.assert_close(tri_cache.kv, ref_cache.kv, atol=0, rtol=0)  # same k/v written
    decode_rows = [starts[i] for i, n in enumerate(query_lens) if n == 1]
    assert (plan.rows.tolist() if plan.rows is not None else []) == decode_rows
    assert len(plan.prefill) == (1 if any(n > 1 for n in query_lens) else 0)


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (16, 16, 80), (28, 4, 96), (8, 1, 64)])
def test_kernel_cuda_large(dtype, h, hkv, d):
    bs, lens = 16, [1, 17, 300, 1024, 4095, 2048, 5, 777]
    cache = _cache(bs, hkv, d, num_blocks=1024, dtype=str(dtype).split(".")[1], device="cuda")
    k_cache, v_cache = cache.layer(1)
    table = _tables(lens, bs, cache.num_blocks).cuda()
    q = torch.randn(len(lens), h, d, device="cuda", dtype=dtype)
    lens_t = torch.tensor(lens, device="cuda")
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
    for window, splits in [(None, None), (None, 1), (None, 7), (256, None)]:
        out = paged_decode_attention(q, k_cache, v_cache, table, lens_t, 1 / math.sqrt(d), window, splits)
        assert out.dtype == dtype
        ref = _reference(q, k_cache, v_cache, table, lens, window)
        torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
