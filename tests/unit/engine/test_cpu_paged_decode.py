"""Native CPU paged decode kernel vs a float64 reference, and TorchSDPABackend with vs without it."""

import math

import pytest
import torch

from engine import native
from engine.attention.backend import AttentionMetadata
from engine.attention.sdpa import TorchSDPABackend
from tests.prereq import require_native
from tests.unit.engine.paged_reference import block_tables as _tables
from tests.unit.engine.paged_reference import random_cache as _cache
from tests.unit.engine.paged_reference import reference_decode as _reference

# one token, partial page, exactly one/two pages (bs 16), several; 200: several 64-key chunks of
# the AVX-512 path (head dims 64 and 128) with a partial 16-key block at the end
LENS = [1, 13, 16, 37, 70, 32, 200]


@pytest.fixture(scope="module")
def mod():
    return require_native()


def _run(mod, h, hkv, d, bs, lens=LENS, window=None, dtype="float32"):
    cache = _cache(bs, hkv, d, num_blocks=sum(-(-n // bs) for n in lens) + 3, dtype=dtype)
    k_cache, v_cache = cache.layer(1)
    assert not k_cache.is_contiguous()  # strided views of kv[1, :, 0] / kv[1, :, 1]
    table = _tables(lens, bs, cache.num_blocks)
    q = torch.randn(len(lens), h, d).to(cache.kv.dtype)
    out = mod.paged_decode(q, k_cache, v_cache, table, torch.tensor(lens), 1 / math.sqrt(d), window or -1)
    assert out.shape == q.shape and out.dtype == q.dtype
    return out, _reference(q, k_cache, v_cache, table, lens, window)


@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("d", [8, 24, 64, 128])
# GQA 1, 3, 4, 7 (more query heads per kv head than the AVX-512 path keeps in registers at once), MQA
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2), (8, 2), (14, 2), (4, 1)])
def test_kernel_matches_reference_fp32(mod, h, hkv, d, bs):
    out, ref = _run(mod, h, hkv, d, bs)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16, 33, 500])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("d", [24, 64])  # the generic path and the AVX-512 one
def test_kernel_sliding_window(mod, window, bs, d):
    out, ref = _run(mod, 6, 2, d, bs, window=window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [64, 128])  # the AVX-512 path, which cuts long sequences into 512-key pieces
@pytest.mark.parametrize("window", [None, 700])
def test_kernel_long_sequences_cut_into_pieces(mod, d, window):
    lens = [1300, 5, 512, 513, 1024, 1]
    cache = _cache(16, 2, d, num_blocks=sum(-(-n // 16) for n in lens) + 3)
    k_cache, v_cache = cache.layer(0)
    table = _tables(lens, 16, cache.num_blocks)
    q = torch.randn(len(lens), 8, d)
    out = mod.paged_decode(q, k_cache, v_cache, table, torch.tensor(lens), 1 / math.sqrt(d), window or -1)
    ref = _reference(q, k_cache, v_cache, table, lens, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lens):  # the cuts depend on positions only: alone, the same bits
        alone = mod.paged_decode(
            q[i : i + 1], k_cache, v_cache, table[i : i + 1], torch.tensor([n]), 1 / math.sqrt(d), window or -1
        )
        assert torch.equal(alone, out[i : i + 1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_half_precision(mod, dtype, window):
    out, ref = _run(mod, 8, 2, 64, 16, lens=[1, 16, 100, 300], window=window, dtype=dtype)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_kernel_threads_strided_q_and_separate_kv_strides(mod):
    cache = _cache(16, 2, 64, num_blocks=64)
    k_cache, v_cache = cache.layer(0)
    v_cache = v_cache.contiguous()  # K and V with different strides
    lens = [5, 33, 200, 1, 48, 77, 130, 16]
    table = _tables(lens, 16, cache.num_blocks)
    q = torch.randn(4, len(lens), 64).transpose(0, 1)  # [B, H=4, D], non-contiguous
    before, pool_before = torch.get_num_threads(), mod.uses_openmp()
    try:
        outs = []
        for openmp in (False, True):  # the kernels' own pool, then torch's OpenMP threads
            mod.set_openmp(openmp)
            for threads in (1, 2, 3):  # same result whatever the thread split
                torch.set_num_threads(threads)
                outs.append(mod.paged_decode(q, k_cache, v_cache, table, torch.tensor(lens), 0.125, -1))
    finally:
        torch.set_num_threads(before)
        mod.set_openmp(pool_before)
    ref = _reference(q, k_cache, v_cache, table, lens)  # 1/sqrt(64) = 0.125
    torch.testing.assert_close(outs[0].double(), ref, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_kernel_rejects_bad_inputs(mod):
    cache = _cache(8, 2, 16, num_blocks=4)
    k_cache, v_cache = cache.layer(0)
    q, table, lens = torch.randn(1, 4, 16), torch.tensor([[0, 1]]), torch.tensor([9])
    with pytest.raises(RuntimeError, match="multiple"):
        mod.paged_decode(torch.randn(1, 3, 16), k_cache, v_cache, table, lens, 0.25, -1)
    with pytest.raises(RuntimeError, match="sliding_window"):
        mod.paged_decode(q, k_cache, v_cache, table, lens, 0.25, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        mod.paged_decode(q.double(), k_cache, v_cache, table, lens, 0.25, -1)
    with pytest.raises(RuntimeError, match="exceed|out of range"):  # 17 tokens need 3 pages of 8
        mod.paged_decode(q, k_cache, v_cache, table, torch.tensor([17]), 0.25, -1)
    with pytest.raises(RuntimeError, match="out of range"):
        mod.paged_decode(q, k_cache, v_cache, torch.tensor([[0, 4]]), lens, 0.25, -1)


def _mixed_step(bs, num_blocks, seq_lens, query_lens, seed=2):
    """Metadata for one step whose new tokens are the last query_lens[i] of each sequence."""
    table = _tables(seq_lens, bs, num_blocks, seed=seed)
    slots, starts = [], [0]
    for i, (n, qn) in enumerate(zip(seq_lens, query_lens)):
        slots += [int(table[i, p // bs]) * bs + p % bs for p in range(n - qn, n)]
        starts.append(starts[-1] + qn)
    return table, starts, torch.tensor(slots, dtype=torch.long)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("query_lens", [[1, 1, 9, 1, 4], [1, 1, 1, 1, 1], [1, 3, 1, 1, 1]])
def test_backend_native_matches_sdpa(mod, query_lens, window):
    h, hkv, d, bs = 6, 2, 24, 8
    seq_lens = [12, 1, 30, 57, 16]
    ref_cache, nat_cache = _cache(bs, hkv, d, 48), _cache(bs, hkv, d, 48)
    table, starts, slots = _mixed_step(bs, ref_cache.num_blocks, seq_lens, query_lens)
    ref_be = TorchSDPABackend(ref_cache, window, native_decode=False)
    nat_be = TorchSDPABackend(nat_cache, window, native_decode=True)
    assert ref_be._native is None and nat_be._native is mod
    ref_meta = AttentionMetadata(slots, starts, seq_lens, table)
    nat_meta = AttentionMetadata(slots, starts, seq_lens, table)
    t = starts[-1]
    for layer in range(2):
        q = torch.randn(t, h, d)
        k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
        ref = ref_be.forward(layer, q, k, v, ref_meta)
        out = nat_be.forward(layer, q, k, v, nat_meta)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(nat_cache.kv, ref_cache.kv)  # same k/v written
    decode = [p for p in nat_meta.plans["sdpa"] if p.seq_lens is not None]
    assert len(decode) == 1 and decode[0].seq_lens.tolist() == [n for n, ql in zip(seq_lens, query_lens) if ql == 1]


def test_backend_default_uses_native_on_cpu(mod, monkeypatch):
    cache = _cache(8, 2, 16, 4)
    assert TorchSDPABackend(cache)._native is mod
    monkeypatch.setattr(native.build, "_loaded", False)  # both restored after the test
    monkeypatch.setattr(native.build, "_module", None)
    monkeypatch.setenv("SPLITSERVE_NATIVE", "0")
    assert TorchSDPABackend(cache)._native is None  # env switch -> torch fallback
    with pytest.raises(RuntimeError, match="unavailable"):
        TorchSDPABackend(cache, native_decode=True)
