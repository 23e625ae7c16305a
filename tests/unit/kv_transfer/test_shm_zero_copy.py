"""The shm transport's one-copy path: ``send_blocks`` from a shared PagedKVCache, the receiver
copying pages straight out of the sender's memfd and verifying them as they land.

Run as ``python -m tests.unit.kv_transfer.test_shm_zero_copy ADDRESS_JSON`` (from the repo
root) it is the sender of ``test_zero_copy_between_two_processes``: it fills a shared cache,
sends ``PLAN`` by reference, prints its sender's status for "a", then sends one chunk of
``CUT_RID`` and waits for a line on stdin ("die": exit without closing, "exit": close).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import SamplingParams
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.paged_cache import PagedKVCache
from engine.types import RequestSpec
from kv_transfer import TransferStatus, make_receiver, make_sender
from kv_transfer.base import tensor_checksum
from kv_transfer.bytes_ops import checksum_pages, copy_pages_with_checksum, page_rows
from kv_transfer.shm_ring import ACK, DESC, FINISH, MAP, frame, recv_json, send_frame_with_fd, send_json
from prefill_worker.build import build_prefill_worker
from tests.unit.kv_transfer.kvt_helpers import CUT_RID, LAYOUT, pages_for, wait_terminal, wait_until

S = TransferStatus
REPO = Path(__file__).resolve().parents[3]
TIMEOUT_S = 60
SRC_BLOCKS = 32
# request "a" (7 pages) by reference from scattered source blocks, in two chunks per layer
SRC_IDS = [5, 6, 7, 20, 2, 3, 30]
PLAN = [(0, SRC_IDS[:4]), (4, SRC_IDS[4:])]  # (first_page, source block ids)


def _shared_source(rid: str, src_ids: list[int], num_blocks: int = SRC_BLOCKS) -> tuple[PagedKVCache, torch.Tensor]:
    """A shared cache holding ``pages_for(rid)`` at ``src_ids``; (cache, pages [L, n, ...])."""
    cache = PagedKVCache(LAYOUT, num_blocks, shared=True)
    pages = pages_for(LAYOUT, rid, len(src_ids))
    cache.kv[:, src_ids] = pages
    return cache, pages


def _landed(cache: PagedKVCache, blocks: list[int], want: torch.Tensor) -> bool:
    return torch.equal(cache.kv[:, blocks].view(torch.uint8), want.view(torch.uint8))


def _send_plan(tx, rid: str, src: PagedKVCache, plan) -> int:
    for layer in range(LAYOUT.num_layers):
        for first, ids in plan:
            tx.send_blocks(rid, layer, first, src, ids)
    tx.finish(rid, LAYOUT.num_layers * len(plan))
    return LAYOUT.num_layers * len(plan)


@pytest.fixture
def pair():
    """(sender, receiver, receiver cache) over shm, closed after the test."""
    cache = PagedKVCache(LAYOUT, 48)
    rx = make_receiver("shm", LAYOUT, cache)
    tx = make_sender("shm", LAYOUT)
    tx.connect(rx.address)
    yield tx, rx, cache
    tx.close()
    rx.close()


def _count_shared_chunks(rx) -> list:
    """Record the by-reference chunks the receiver applies (rid per call)."""
    seen, real = [], rx.book.on_shared_pages

    def counting(rid, *args):
        seen.append(rid)
        real(rid, *args)

    rx.book.on_shared_pages = counting
    return seen


# ----------------------------------------------------------------------------- the cache


def test_shared_cache_is_an_anonymous_sealed_memfd():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    cache = PagedKVCache(LAYOUT, 6, shared=True)
    assert cache.kv.shape == (LAYOUT.num_layers, 6, *LAYOUT.page_shape) and not cache.kv.any()
    assert os.readlink(f"/proc/self/fd/{cache.shared_fd}").startswith("/memfd:")
    assert (set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()) == before
    import fcntl

    assert fcntl.fcntl(cache.shared_fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(cache.shared_fd, 0)
    # a second mapping of the fd sees the tensor's writes: the memory really is shared
    cache.kv[2, 4] = 1.0
    rows = page_rows(cache.kv, LAYOUT.page_bytes)
    other = np.fromfile(f"/proc/self/fd/{cache.shared_fd}", dtype=np.uint8).reshape(rows.shape)
    assert np.array_equal(other, rows) and other[2, 4].any()
    assert PagedKVCache(LAYOUT, 6).shared_fd is None


def test_shared_cache_refuses_a_non_cpu_device():
    with pytest.raises(ValueError, match="CPU"):
        PagedKVCache(LAYOUT, 4, device="meta", shared=True)


def test_page_checksums_match_the_gathered_chunk():
    cache, _ = _shared_source("sum", SRC_IDS)
    rows = page_rows(cache.kv, LAYOUT.page_bytes)[1]
    assert checksum_pages(rows, SRC_IDS) == tensor_checksum(cache.kv[1, SRC_IDS])
    dst = np.zeros((12, LAYOUT.page_bytes), np.uint8)
    dst_ids = [9, 10, 11, 0, 1, 4, 5]  # runs that break on either side
    assert copy_pages_with_checksum(dst, dst_ids, rows, SRC_IDS) == checksum_pages(rows, SRC_IDS)
    assert np.array_equal(dst[dst_ids], rows[SRC_IDS])


# ------------------------------------------------------------------------- the transport


def test_zero_copy_between_two_processes():
    """The sender (a child) shares its cache; every page lands byte-identical, by reference;
    the child's sender reports DONE; killing it mid-request fails that request."""
    cache = PagedKVCache(LAYOUT, 48)
    rx = make_receiver("shm", LAYOUT, cache)
    shared_chunks = _count_shared_chunks(rx)
    blocks = [40, 41, 3, 4, 5, 17, 30]
    rx.expect("a", blocks)
    rx.expect(CUT_RID, [0, 1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    peer = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.kv_transfer.test_shm_zero_copy", json.dumps(rx.address)],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peer.stdout.readline().strip() == "a done", peer.stderr.read()
        assert wait_terminal(rx, "a", TIMEOUT_S) is S.DONE, rx.error("a")
        assert _landed(cache, blocks, pages_for(LAYOUT, "a", len(SRC_IDS)))
        assert shared_chunks.count("a") == LAYOUT.num_layers * len(PLAN)  # all by reference
        assert peer.stdout.readline().strip() == "sent"
        wait_until(lambda: rx.poll(CUT_RID) is S.TRANSFERRING, TIMEOUT_S, "the unfinished request's chunk")
        peer.stdin.write("die\n")
        peer.stdin.flush()
        assert wait_terminal(rx, CUT_RID, TIMEOUT_S) is S.FAILED
        peer.communicate(timeout=TIMEOUT_S)
        assert peer.returncode == 3
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        rx.close()


def _peer_main(address_json: str) -> None:
    tx = make_sender("shm", LAYOUT)
    tx.connect(json.loads(address_json))
    src, _ = _shared_source("a", SRC_IDS)
    _send_plan(tx, "a", src, PLAN)
    wait_terminal(tx, "a", TIMEOUT_S)
    print(f"a {tx.poll('a').value}", flush=True)
    cut_src, _ = _shared_source(CUT_RID, [8, 9])
    tx.send_blocks(CUT_RID, 0, 0, cut_src, [8, 9])  # never finished
    print("sent", flush=True)
    if sys.stdin.readline().strip() == "die":
        os._exit(3)
    tx.close()


def test_chunks_before_expect_are_buffered_then_applied(pair):
    tx, rx, cache = pair
    src, want = _shared_source("early", SRC_IDS)
    _send_plan(tx, "early", src, PLAN)
    wait_until(lambda: tx.poll("early") is S.DONE, TIMEOUT_S, "the sender to finish")  # all read already
    src.kv.zero_()  # the buffered copies must not depend on the source any more
    blocks = list(range(10, 17))
    rx.expect("early", blocks)
    assert wait_terminal(rx, "early") is S.DONE, rx.error("early")
    assert _landed(cache, blocks, want)


def test_source_changed_after_send_blocks_fails_the_request(pair):
    """A source page written between the sender's hash (at send_blocks) and the receiver's
    copy: the request FAILS on its checksum; the link and later requests are unaffected."""
    tx, rx, cache = pair
    src, want = _shared_source("bad", SRC_IDS)
    real = rx.book.on_shared_pages

    def write_source_first(rid, layer, *args):
        if rid == "bad" and layer == 1:  # the descriptor is here, the copy not yet done
            src.kv[1, SRC_IDS[0], 0, 0, 0, 0] += 1.0
        real(rid, layer, *args)

    rx.book.on_shared_pages = write_source_first
    pool = BlockPool(48, enable_prefix_caching=False)
    blocks = pool.allocate(len(SRC_IDS))
    rx.expect("bad", blocks)
    _send_plan(tx, "bad", src, PLAN)
    assert wait_terminal(rx, "bad") is S.FAILED
    assert "checksum mismatch" in rx.error("bad") and "layer 1" in rx.error("bad")
    assert wait_terminal(tx, "bad") is S.DONE  # the sender only says its pages are free
    rx.cancel("bad")  # what the decode worker does with a FAILED transfer: never admitted
    pool.free(blocks)
    assert pool.num_free == 48

    good, want = _shared_source("good", SRC_IDS)
    rx.expect("good", blocks)
    _send_plan(tx, "good", good, PLAN)
    assert wait_terminal(rx, "good") is S.DONE, rx.error("good")
    assert _landed(cache, blocks, want)


def test_sender_is_done_only_after_every_descriptor_is_acked(pair):
    tx, rx, _ = pair
    src, _ = _shared_source("slow", SRC_IDS)
    entered, release = threading.Event(), threading.Event()
    real = rx.book.on_shared_pages

    def blocking(*args):
        entered.set()
        release.wait(TIMEOUT_S)
        real(*args)

    rx.book.on_shared_pages = blocking
    rx.expect("slow", list(range(len(SRC_IDS))))
    try:
        _send_plan(tx, "slow", src, PLAN)
        assert entered.wait(TIMEOUT_S)
        # the finish is on the wire, yet the receiver still reads the source: not DONE
        wait_until(lambda: "slow" in tx._finish_sent, TIMEOUT_S, "the finish to be transmitted")
        assert tx.poll("slow") is S.TRANSFERRING
    finally:
        release.set()
    assert wait_terminal(tx, "slow") is S.DONE
    assert wait_terminal(rx, "slow") is S.DONE, rx.error("slow")


def test_many_requests_with_cancels_leave_no_block_behind(pair):
    """Every third request is cancelled while its chunks are in flight: once cancel() has
    returned, none of its bytes land (its blocks keep a sentinel until the sender is DONE,
    i.e. every descriptor was processed, then go back to the pool); the others land in
    blocks that earlier requests just gave back; the pool returns to full."""
    tx, rx, cache = pair
    src = PagedKVCache(LAYOUT, SRC_BLOCKS, shared=True)
    src.kv.copy_(pages_for(LAYOUT, "many", SRC_BLOCKS))
    pool = BlockPool(cache.num_blocks, enable_prefix_caching=False)
    rng = np.random.default_rng(0)
    live, cancelled = {}, {}

    def settle(block: bool) -> None:
        for rid in list(cancelled):
            if block:
                wait_terminal(tx, rid)
            if tx.poll(rid).terminal:
                blocks = cancelled.pop(rid)
                assert tx.poll(rid) is S.DONE, tx.error(rid)
                assert (cache.kv[:, blocks] == 7.0).all(), f"{rid} wrote into its blocks after cancel()"
                with pytest.raises(KeyError):
                    rx.poll(rid)
                pool.free(blocks)
        for rid in list(live):
            if block:
                wait_terminal(rx, rid)
            if rx.poll(rid).terminal:
                blocks, src_ids = live.pop(rid)
                assert rx.poll(rid) is S.DONE, rx.error(rid)
                assert _landed(cache, blocks, src.kv[:, src_ids])
                rx.cancel(rid)  # what the decode worker does once it admitted the request
                pool.free(blocks)

    for i in range(60):
        rid, n = f"m{i}", int(rng.integers(1, 6))
        src_ids = rng.choice(SRC_BLOCKS, n, replace=False).tolist()
        if pool.num_free < n:
            settle(block=True)
        blocks = pool.allocate(n)
        rx.expect(rid, blocks)
        _send_plan(tx, rid, src, [(0, src_ids[:1]), (1, src_ids[1:])] if n > 1 else [(0, src_ids)])
        if i % 3 == 0:
            rx.cancel(rid)
            cache.kv[:, blocks] = 7.0  # sentinel
            cancelled[rid] = blocks
        else:
            live[rid] = (blocks, src_ids)
        settle(block=False)
    settle(block=True)
    assert not live and not cancelled
    assert pool.num_free == cache.num_blocks


def test_send_blocks_copies_from_a_private_cache(pair):
    """No shared fd (or a fault hook): send_blocks is send() of a copy, through the ring."""
    tx, rx, cache = pair
    shared_chunks = _count_shared_chunks(rx)
    src = PagedKVCache(LAYOUT, SRC_BLOCKS)
    src.kv[:, SRC_IDS] = pages_for(LAYOUT, "private", len(SRC_IDS))
    blocks = list(range(20, 27))
    rx.expect("private", blocks)
    _send_plan(tx, "private", src, PLAN)
    assert wait_terminal(rx, "private") is S.DONE, rx.error("private")
    assert _landed(cache, blocks, pages_for(LAYOUT, "private", len(SRC_IDS)))
    assert shared_chunks == []


def test_send_blocks_validates_its_arguments(pair):
    tx, _, _ = pair
    src, _ = _shared_source("v", SRC_IDS)
    for ids in ([], [SRC_BLOCKS], [-1]):
        with pytest.raises(ValueError, match="block ids"):
            tx.send_blocks("v", 0, 0, src, ids)
    with pytest.raises(ValueError, match="layer"):
        tx.send_blocks("v", LAYOUT.num_layers, 0, src, [1])


def test_prefill_worker_sends_fixed_pages_by_reference_and_a_growing_one_by_copy(tiny_checkpoint):
    """20 tokens, block_size 4, budget 6: chunks end at 6 (mid-page), 12, 18 (mid-page), 20.
    Per layer: 4 chunks by reference, 2 by copy (the partial last page of chunks 1 and 3,
    which the next chunk appends to); what lands equals the prefill worker's cache."""
    engine = {"block_size": 4, "num_blocks": 32, "max_num_batched_tokens": 6}
    w = build_prefill_worker(tiny_checkpoint("llama"), engine, transport="shm", worker_id="p")
    layout = w.engine.layout
    cache = PagedKVCache(layout, 16)
    rx = make_receiver("shm", layout, cache)
    by_ref = _count_shared_chunks(rx)
    by_copy, real_on_chunk = [], rx.book.on_chunk
    rx.book.on_chunk = lambda chunk: (by_copy.append(chunk.first_page), real_on_chunk(chunk))
    src_block: dict[int, int] = {}  # page -> the prefill worker's block
    real_factory = w._sender_factory

    def recording_factory():
        tx = real_factory()
        real_send_blocks = tx.send_blocks

        def send_blocks(rid, layer, first, src, ids):
            src_block.update({first + j: b for j, b in enumerate(ids)})
            real_send_blocks(rid, layer, first, src, ids)

        tx.send_blocks = send_blocks
        return tx

    w._sender_factory = recording_factory
    try:
        assert w.engine.cache.shared_fd is not None  # build asks for it on shm
        blocks = list(range(3, 8))
        rx.expect("r", blocks)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        w.prefill(RequestSpec("r", list(range(10, 30)), params), rx.address)
        assert wait_terminal(rx, "r") is S.DONE, rx.error("r")
        assert len(by_ref) == 4 * layout.num_layers
        assert sorted(by_copy) == sorted([1, 4] * layout.num_layers)  # partial pages 1 and 4
        assert sorted(src_block) == list(range(5))
        want = w.engine.cache.kv[:, [src_block[p] for p in range(5)]]
        assert torch.equal(cache.kv[:, blocks].view(torch.uint8), want.view(torch.uint8))
    finally:
        w.shutdown()
        rx.close()


# -------------------------------------------------------------- a hostile or buggy sender


class RawSender:
    """Speaks the shm protocol by hand, to send descriptors the real sender never would.
    ``desc`` returns once the receiver has acknowledged (i.e. processed) the descriptor."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        send_json(self.sock, {"layout": LAYOUT.to_dict()})
        assert recv_json(self.sock)["ok"]
        send_json(self.sock, {"t": "attached"})

    def map(self, index: int, num_blocks: int, fd: int) -> None:
        send_frame_with_fd(self.sock, b"m" + MAP.pack(index, num_blocks), fd)

    def desc(self, rid: str, layer: int, first: int, ids: list[int], checksum: int, index=0, n=None) -> None:
        r = rid.encode()
        head = DESC.pack(index, layer, first, len(ids) if n is None else n, checksum, len(r))
        self.sock.sendall(frame(b"d" + head + r + np.asarray(ids, "<u4").tobytes()))
        assert self.sock.recv(1) == ACK

    def finish(self, rid: str, num_chunks: int) -> None:
        self.sock.sendall(frame(b"f" + FINISH.pack(num_chunks) + rid.encode()))

    def close(self) -> None:
        self.sock.sendall(frame(b"b"))
        self.sock.close()


def test_bad_descriptors_fail_their_request_and_nothing_else():
    cache = PagedKVCache(LAYOUT, 48)
    rx = make_receiver("shm", LAYOUT, cache)
    src, want = _shared_source("ok", SRC_IDS)
    rows = page_rows(src.kv, LAYOUT.page_bytes)
    unsealed = os.memfd_create("not-a-cache")  # right size, no seals: must not be mapped
    os.ftruncate(unsealed, LAYOUT.num_layers * SRC_BLOCKS * LAYOUT.page_bytes)
    raw = RawSender(rx.address)
    try:
        raw.map(0, SRC_BLOCKS, src.shared_fd)
        raw.map(1, SRC_BLOCKS, unsealed)
        bad = {
            "past-the-cache": dict(ids=[1, SRC_BLOCKS]),
            "huge-id": dict(ids=[2**32 - 1]),
            "count-mismatch": dict(ids=[1, 2], n=3),
            "no-pages": dict(ids=[], n=0),
            "layer": dict(ids=[1], layer=LAYOUT.num_layers),
            "unmapped": dict(ids=[1], index=7),
            "unsealed": dict(ids=[1], index=1),
        }
        for i, (rid, kw) in enumerate(bad.items()):
            if i % 2:
                rx.expect(rid, [i])  # expected: FAILED now; not yet expected: FAILED at expect
            layer = kw.pop("layer", 0)
            raw.desc(rid, layer, 0, checksum=0, **kw)
        for i, rid in enumerate(bad):
            if not i % 2:
                rx.expect(rid, [i])
            assert rx.poll(rid) is S.FAILED, rid
        # each for its own reason, not merely FAILED
        reasons = {
            "past-the-cache": f"block id {SRC_BLOCKS} outside the sender's {SRC_BLOCKS} blocks",
            "huge-id": f"block id {2**32 - 1} outside the sender's {SRC_BLOCKS} blocks",
            "count-mismatch": "claims 3 pages but carries 2 block ids",
            "no-pages": "claims 0 pages but carries 0 block ids",
            "layer": f"descriptor for layer {LAYOUT.num_layers}, layout has {LAYOUT.num_layers} layers",
            "unmapped": "descriptor names shared cache 7, only 2 mapped",
            "unsealed": "not sealed",
        }
        assert {rid: reason in rx.error(rid) for rid, reason in reasons.items()} == dict.fromkeys(bad, True), {
            rid: rx.error(rid) for rid in bad
        }
        # the connection and the receiver survive: a good request on the same link lands
        blocks = list(range(20, 27))
        rx.expect("ok", blocks)
        for layer in range(LAYOUT.num_layers):
            raw.desc("ok", layer, 0, SRC_IDS, checksum_pages(rows[layer], SRC_IDS))
        raw.finish("ok", LAYOUT.num_layers)
        assert wait_terminal(rx, "ok") is S.DONE, rx.error("ok")
        assert _landed(cache, blocks, want)
        assert not cache.kv[:, : len(bad)].any()  # nothing landed for the bad ones
    finally:
        raw.close()
        os.close(unsealed)
        rx.close()


if __name__ == "__main__":
    _peer_main(sys.argv[1])
