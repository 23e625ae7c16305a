"""The native page hash (engine/native/csrc/xxh3_pages.cpp) against the xxhash library, and
bytes_ops choosing it: the shm transport's checksums must equal ``tensor_checksum`` of the
gathered pages whichever path computed them (a receiver without the kernel, or with other
pages, talks to a sender with it)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import xxhash

from engine import native
from kv_transfer import bytes_ops
from kv_transfer.base import tensor_checksum
from kv_transfer.bytes_ops import checksum_pages, copy_pages_with_checksum
from tests.prereq import require_native


@pytest.fixture(scope="module")
def mod():
    return require_native()


def _impls(mod) -> list[int]:
    """Every variant this build has: 1 scalar, 2 AVX2, 3 AVX-512F (best = the highest)."""
    return list(range(1, mod.xxh3_pages_best_impl() + 1))


def _reference(rows: np.ndarray, ids: list[int]) -> int:
    h = xxhash.xxh3_64()
    for i in ids:
        h.update(rows[i])
    return h.intdigest()


# page sizes around the XXH3 block (1024 B = 16 stripes) and short/long boundaries; totals
# from 256 B (just past the 240-byte short-input paths) to 2 MiB
@pytest.mark.parametrize("page_bytes", [64, 128, 192, 960, 1024, 1088, 4096, 65536])
def test_hash_and_copy_equal_xxhash_for_every_variant(mod, page_bytes):
    rng = np.random.default_rng(page_bytes)
    pick = random.Random(page_bytes)
    rows = rng.integers(0, 256, (33, page_bytes), dtype=np.uint8)
    for trial in range(12):
        n = pick.randint(1, 33)
        if n * page_bytes <= 240:
            continue
        ids = list(range(n)) if trial % 3 == 0 else pick.sample(range(33), n)
        want = _reference(rows, ids)
        for impl in _impls(mod):
            assert mod.xxh3_pages(rows, ids, page_bytes=page_bytes, impl=impl) == want, (impl, ids)
            dst = np.zeros((40, page_bytes), np.uint8)
            dst_ids = pick.sample(range(40), n)
            got = mod.xxh3_pages(rows, ids, dst, dst_ids, page_bytes=page_bytes, impl=impl)
            assert got == want, (impl, ids, dst_ids)
            assert np.array_equal(dst[dst_ids], rows[ids])
            untouched = sorted(set(range(40)) - set(dst_ids))
            assert not dst[untouched].any()  # nothing written outside the named pages


def test_unaligned_destination_takes_plain_stores(mod):
    """Non-temporal stores need 64-byte alignment: an unaligned destination still copies
    (ordinary stores) with the same digest."""
    page_bytes = 1024
    rows = np.random.default_rng(1).integers(0, 256, (8, page_bytes), dtype=np.uint8)
    backing = np.zeros(9 * page_bytes + 64, np.uint8)
    start = (64 - backing.ctypes.data % 64) % 64 + 3  # 3 bytes past a cache line
    dst = backing[start : start + 8 * page_bytes].reshape(8, page_bytes)
    assert dst.ctypes.data % 64 == 3
    for impl in _impls(mod):
        dst[:] = 0
        assert mod.xxh3_pages(rows, [5, 6, 1], dst, [0, 1, 7], page_bytes=page_bytes, impl=impl) == _reference(
            rows, [5, 6, 1]
        )
        assert np.array_equal(dst[[0, 1, 7]], rows[[5, 6, 1]])


def test_bad_arguments_name_the_problem(mod):
    rows = np.zeros((4, 128), np.uint8)
    with pytest.raises(IndexError, match="source page id 4"):
        mod.xxh3_pages(rows, [0, 4], page_bytes=128)
    with pytest.raises(IndexError, match="destination page id 9"):
        mod.xxh3_pages(rows, [0, 1], np.zeros((4, 128), np.uint8), [0, 9], page_bytes=128)
    with pytest.raises(ValueError, match="multiple of 64"):
        mod.xxh3_pages(np.zeros((4, 96), np.uint8), [0, 1, 2, 3], page_bytes=96)
    with pytest.raises(ValueError, match="more than 240"):
        mod.xxh3_pages(rows, [0], page_bytes=128)
    with pytest.raises(ValueError, match="one destination page per source page"):
        mod.xxh3_pages(rows, [0, 1], np.zeros((4, 128), np.uint8), [0], page_bytes=128)
    with pytest.raises(ValueError, match="src: buffer must be C-contiguous"):
        mod.xxh3_pages(np.zeros((4, 256), np.uint8)[:, ::2], [0, 1], page_bytes=128)
    read_only = np.zeros((4, 128), np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        mod.xxh3_pages(rows, [0, 1], read_only, [0, 1], page_bytes=128)


def test_a_flipped_byte_changes_the_digest(mod):
    rows = np.random.default_rng(2).integers(0, 256, (6, 4096), dtype=np.uint8)
    ids = [3, 0, 4]
    base = mod.xxh3_pages(rows, ids, page_bytes=4096)
    for page, byte in [(3, 0), (0, 2049), (4, 4095)]:  # first, middle and last stripe of the stream
        rows[page, byte] ^= 0x10
        assert mod.xxh3_pages(rows, ids, page_bytes=4096) != base
        rows[page, byte] ^= 0x10
    assert mod.xxh3_pages(rows, ids, page_bytes=4096) == base


@pytest.mark.parametrize("page_bytes", [48, 256, 4096])  # 48: not a multiple of 64, numpy path
def test_bytes_ops_paths_agree(mod, monkeypatch, page_bytes):
    """checksum_pages / copy_pages_with_checksum give the same digests, and copy the same
    bytes, with the kernel and without it (SPLITSERVE_NATIVE=0 or an unbuilt kernel)."""
    rows = np.random.default_rng(3).integers(0, 256, (10, page_bytes), dtype=np.uint8)
    src_ids, dst_ids = [7, 8, 9, 2, 3, 0], [0, 1, 2, 5, 6, 9]
    gathered = tensor_checksum(torch.from_numpy(rows[src_ids].copy()))
    results = []
    for with_native in (True, False):
        monkeypatch.setattr(native, "load", lambda with_native=with_native: mod if with_native else None)
        dst = np.zeros((10, page_bytes), np.uint8)
        results.append((checksum_pages(rows, src_ids), copy_pages_with_checksum(dst, dst_ids, rows, src_ids)))
        assert np.array_equal(dst[dst_ids], rows[src_ids])
    assert results[0] == results[1] == (gathered, gathered)


def test_transports_load_the_kernel_up_front(monkeypatch):
    """warm_native loads the kernel through engine.native.load (built once per process there)
    and reports availability (False when disabled)."""
    calls: list[int] = []
    monkeypatch.setattr(native, "load", lambda: calls.append(1))
    assert bytes_ops.warm_native() is False
    assert calls == [1]
