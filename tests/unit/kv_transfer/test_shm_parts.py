"""The pieces under the shm fast path: checksum, fused copy, page scatter, ring, framing."""

from __future__ import annotations

import random
import socket
import threading

import numpy as np
import pytest
import torch
import xxhash

from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer import TransferStatus, make_receiver, make_sender
from kv_transfer.bytes_ops import PageScatter, checksum_bytes, copy_with_checksum, tensor_bytes
from kv_transfer.shm_ring import ALIGN, MAX_FRAME, FrameReader, Ring, frame
from tests.unit.kv_transfer.kvt_helpers import (
    LAYOUT,
    NUM_BLOCKS,
    SCENARIO,
    assign_blocks,
    pages_for,
    send_requests,
    wait_terminal,
)


def _random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("n", [0, 1, 1000, (256 << 10) + 3, (3 << 20) + 5])
def test_copy_with_checksum_copies_and_matches_the_one_shot_checksum(n):
    src = _random_bytes(n)
    dst = np.zeros_like(src)
    got = copy_with_checksum(dst, src)
    assert np.array_equal(dst, src)
    assert got == checksum_bytes(src)
    h = xxhash.xxh3_64_intdigest(src)  # the piecewise (streaming) hash is the one-shot hash
    assert got == (h ^ (h >> 32)) & 0xFFFFFFFF


def test_checksum_sees_zero_extension_and_swapped_words():
    buf = _random_bytes(1 << 16, seed=1)
    base = checksum_bytes(buf)
    assert checksum_bytes(np.concatenate([buf, np.zeros(1, np.uint8)])) != base
    words = buf.copy().view(np.uint64)
    words[[3, 700]] = words[[700, 3]]
    assert checksum_bytes(words.view(np.uint8)) != base
    assert checksum_bytes(buf.copy()) == base


def test_copy_with_checksum_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="dst"):
        copy_with_checksum(np.zeros(10, np.uint8), np.zeros(11, np.uint8))


@pytest.mark.parametrize("block_ids", [[3, 4, 5, 6], [9, 2, 5, 6, 7, 0], [11]])
def test_page_scatter_writes_what_write_pages_writes(block_ids):
    pages = pages_for(LAYOUT, "scatter", len(block_ids))[1]  # [n, 2, bs, Hkv, D]
    fast, slow = PagedKVCache(LAYOUT, 12), PagedKVCache(LAYOUT, 12)
    assert PageScatter.supports(fast)
    PageScatter(fast).write(1, block_ids, tensor_bytes(pages).numpy())
    slow.write_pages(1, block_ids, pages)
    assert torch.equal(fast.kv.view(torch.uint8), slow.kv.view(torch.uint8))
    assert fast.kv[1, block_ids].any() and not fast.kv[[0, 2]].any()


def _check_ring(ring: Ring, live: list[tuple[int, int]], window: int) -> None:
    spans = sorted(live)
    for (a, b), (c, _) in zip(spans, spans[1:], strict=False):
        assert b <= c, f"slots [{a},{b}) and [{c},..) overlap"
    for off, end in live:
        assert off % ALIGN == 0 and 0 <= off < end <= ring.size
        if end - off <= window:
            assert end <= window, "a small slot left the hot window"


@pytest.mark.parametrize("seed", range(20))
def test_ring_slots_never_overlap_and_small_ones_stay_in_the_window(seed):
    rnd = random.Random(seed)
    size, window = ALIGN * rnd.randint(8, 64), ALIGN * rnd.randint(2, 40)
    ring, live = Ring(size, window), []
    for _ in range(400):
        if live and (rnd.random() < 0.45 or len(live) > 20):
            k = rnd.randint(1, len(live))
            ring.free(k)
            del live[:k]
        else:
            n = ALIGN * rnd.randint(1, size // ALIGN)
            off = ring.alloc(n)
            if not live:
                assert off == 0, "an empty ring must place any fitting slot at 0"
            if off is not None:
                live.append((off, off + n))
        assert len(ring) == len(live)
        _check_ring(ring, live, min(window, size))


def test_ring_refuses_bad_sizes_and_extra_credits():
    ring = Ring(4 * ALIGN, 2 * ALIGN)
    with pytest.raises(ValueError, match=f"slot of {5 * ALIGN} bytes in a {4 * ALIGN}-byte arena"):
        ring.alloc(5 * ALIGN)
    assert ring.alloc(3 * ALIGN) == 0  # larger than the window: may use the whole arena
    assert ring.alloc(ALIGN) is None  # a small slot waits for room inside the window
    assert ring.alloc(ALIGN) is None
    ring.free(1)
    assert ring.alloc(ALIGN) == 0 and ring.alloc(ALIGN) == ALIGN and ring.alloc(ALIGN) is None
    with pytest.raises(ValueError, match="credits"):
        ring.free(3)


def test_frame_reader_reassembles_split_and_batched_frames():
    a, b = socket.socketpair()
    try:
        bodies = [b"c" + bytes(range(40)), b"f", b"x" * 5000]
        wire = b"".join(frame(x) for x in bodies)
        sender = threading.Thread(target=lambda: [a.sendall(wire[i : i + 7]) for i in range(0, len(wire), 7)])
        sender.start()
        reader = FrameReader(b)
        assert [reader.next() for _ in bodies] == bodies
        sender.join()
        a.sendall(frame(b"q") + frame(b"r"))  # two frames, one recv
        assert reader.next() == b"q" and reader.next() == b"r"
        a.sendall((MAX_FRAME + 1).to_bytes(4, "little"))
        with pytest.raises(ValueError, match="frame"):
            reader.next()
        a.close()
        with pytest.raises(EOFError):
            FrameReader(b).next()
    finally:
        a.close()
        b.close()


def test_shm_with_a_window_smaller_than_some_chunks():
    """Window of 2 pages, arena of 8: small chunks cycle in the window, 3-page ones use the
    rest of the arena; every byte still lands, and close() leaves no transport thread."""
    cache = PagedKVCache(LAYOUT, NUM_BLOCKS)
    rx = make_receiver("shm", LAYOUT, cache, arena_bytes=8 * LAYOUT.page_bytes)
    tx = make_sender("shm", LAYOUT, window_bytes=2 * LAYOUT.page_bytes)
    try:
        tx.connect(rx.address)
        blocks = assign_blocks(SCENARIO, NUM_BLOCKS, seed=3)
        for r in SCENARIO:
            rx.expect(r.rid, blocks[r.rid])
        send_requests(tx, LAYOUT, SCENARIO)
        for r in SCENARIO:
            assert wait_terminal(rx, r.rid) is TransferStatus.DONE, rx.error(r.rid)
            want = pages_for(LAYOUT, r.rid, r.num_pages)
            assert torch.equal(cache.kv[:, blocks[r.rid]].view(torch.uint8), want.view(torch.uint8))
    finally:
        tx.close()
        rx.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("kv-shm")]


def test_shm_sender_refuses_a_non_positive_window():
    with pytest.raises(ValueError, match="window_bytes"):
        make_sender("shm", LAYOUT, window_bytes=0)
