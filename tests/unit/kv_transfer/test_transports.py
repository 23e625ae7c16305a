"""Every transport, sender and receiver in this process (real sockets / groups / servers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.kv_cache.layout import KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer import KVChunk, KVTransferError, TransferStatus, make_receiver, make_sender
from tests.unit.kv_transfer.kvt_helpers import (
    LAYOUT,
    NUM_BLOCKS,
    SCENARIO,
    Req,
    assign_blocks,
    chunk_plan,
    pages_for,
    send_requests,
    wait_terminal,
    wait_until,
)

S = TransferStatus
KINDS = ["loopback", "shm", "torch", "grpc"]
# small limits so the tests exercise the shm ring wrap-around and gRPC part splitting
RX_OPTS = {"shm": {"arena_bytes": 5 * LAYOUT.page_bytes}}
TX_OPTS = {"grpc": {"max_part_bytes": 100}}


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def endpoints(kind):
    """make(sender_layout=LAYOUT, fault_hook=None) -> (sender, receiver, cache); all closed after."""
    made = []

    def make(sender_layout=LAYOUT, fault_hook=None, connect=True):
        cache = PagedKVCache(LAYOUT, NUM_BLOCKS)
        rx = make_receiver(kind, LAYOUT, cache, **RX_OPTS.get(kind, {}))
        made.append(rx)
        tx = make_sender(kind, sender_layout, fault_hook=fault_hook, **TX_OPTS.get(kind, {}))
        made.append(tx)
        if connect:
            tx.connect(rx.address)
        return tx, rx, cache

    yield make
    for endpoint in reversed(made):
        endpoint.close()


def _expect_all(rx, reqs) -> dict[str, list[int]]:
    blocks = assign_blocks(reqs, NUM_BLOCKS, seed=1)
    for r in reqs:
        rx.expect(r.rid, blocks[r.rid])
    return blocks


def _assert_landed(cache, blocks, reqs) -> None:
    for r in reqs:
        want = pages_for(LAYOUT, r.rid, r.num_pages)  # [L, n, 2, bs, Hkv, D]
        got = cache.kv[:, blocks[r.rid]]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{r.rid} not byte-identical"


def test_multi_request_multi_layer_multi_chunk_transfer(endpoints):
    tx, rx, cache = endpoints()
    blocks = _expect_all(rx, SCENARIO)
    for r in SCENARIO:
        assert rx.poll(r.rid) is S.BOOTSTRAPPING
    send_requests(tx, LAYOUT, SCENARIO)
    for r in SCENARIO:
        assert wait_terminal(rx, r.rid) is S.DONE, rx.error(r.rid)
        assert wait_terminal(tx, r.rid) is S.DONE, tx.error(r.rid)
    _assert_landed(cache, blocks, SCENARIO)
    used = {b for ids in blocks.values() for b in ids}
    others = [b for b in range(NUM_BLOCKS) if b not in used]
    assert not cache.kv[:, others].any(), "bytes landed outside the reserved blocks"


@pytest.mark.parametrize("field, value", [("block_size", 8), ("dtype", "float16"), ("num_kv_heads", 4)])
def test_layout_mismatch_is_refused_naming_the_field(endpoints, kind, field, value):
    bad = dataclasses.replace(LAYOUT, **{field: value})
    tx, rx, cache = endpoints(sender_layout=bad, connect=False)
    with pytest.raises(KVLayoutMismatch, match=field):
        tx.connect(rx.address)
    with pytest.raises(KVTransferError, match="not connected"):
        tx.send("a", 0, 0, torch.zeros(1, *bad.page_shape, dtype=bad.torch_dtype))
    # the receiver still serves a correct sender afterwards
    good = make_sender(kind, LAYOUT)
    try:
        good.connect(rx.address)
        req = Req("ok", 2, (2,))
        blocks = _expect_all(rx, (req,))
        send_requests(good, LAYOUT, (req,))
        assert wait_terminal(rx, "ok") is S.DONE, rx.error("ok")
        _assert_landed(cache, blocks, (req,))
    finally:
        good.close()


def _hook_for(rid: str, layer: int, mutate):
    """Fault hook mutating one chunk (after it was checksummed) of ``rid``/``layer``."""

    def hook(chunk: KVChunk) -> KVChunk:
        if chunk.request_id == rid and chunk.layer == layer:
            raw = chunk.payload.clone().reshape(-1).view(torch.uint8)
            chunk = dataclasses.replace(chunk, payload=mutate(raw))
        return chunk

    return hook


def _flip(raw: torch.Tensor) -> torch.Tensor:
    raw[raw.numel() // 2] ^= 0x01
    return raw


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_flip, "checksum mismatch"),
        (lambda raw: raw[:-3], "truncated chunk"),
        (lambda raw: torch.cat([raw, raw[:5]]), "over-long chunk"),
    ],
    ids=["corrupted", "truncated", "over-long"],
)
def test_bad_chunk_fails_request_and_leaves_its_blocks_untouched(endpoints, kind, mutate, message):
    bad, good = Req("bad", 4, (4,)), Req("good", 3, (1, 2))
    tx, rx, cache = endpoints(fault_hook=_hook_for("bad", 1, mutate))
    blocks = _expect_all(rx, (bad, good))
    send_requests(tx, LAYOUT, (bad, good))
    assert wait_terminal(rx, "bad") is S.FAILED
    assert message in rx.error("bad")
    assert not cache.kv[1:, blocks["bad"]].any(), "the bad chunk (or a later one) was written"
    assert wait_terminal(rx, "good") is S.DONE, rx.error("good")
    _assert_landed(cache, blocks, (good,))
    if kind == "grpc":  # the only transport that acknowledges: the sender learns it
        assert wait_terminal(tx, "bad") is S.FAILED and message in tx.error("bad")


def test_cancel_drops_late_chunks(endpoints):
    tx, rx, cache = endpoints()
    victim, marker = Req("victim", 2, (2,)), Req("marker", 1, (1,))
    blocks = _expect_all(rx, (victim, marker))
    plan = chunk_plan(LAYOUT, victim)
    tx.send("victim", *plan[0])
    wait_until(lambda: rx.poll("victim") is S.TRANSFERRING, what="first victim chunk")
    rx.cancel("victim")
    with pytest.raises(KeyError):
        rx.poll("victim")
    for item in plan[1:]:
        tx.send("victim", *item)
    tx.finish("victim", len(plan))
    send_requests(tx, LAYOUT, (marker,))
    # marker DONE: ordered links processed the victim's late chunks first; gRPC streams are
    # independent, but its sender settles only after the receiver consumed the stream
    assert wait_terminal(rx, "marker") is S.DONE
    wait_terminal(tx, "victim")
    assert torch.equal(cache.kv[0, blocks["victim"]], pages_for(LAYOUT, "victim", 2)[0])
    assert not cache.kv[1:, blocks["victim"]].any(), "a chunk arriving after cancel() was written"


def test_chunks_before_expect_are_buffered(endpoints):
    tx, rx, cache = endpoints()
    early, marker = Req("early", 3, (1, 2)), Req("marker", 1, (1,))
    rx.expect("marker", [0])
    send_requests(tx, LAYOUT, (early,))
    send_requests(tx, LAYOUT, (marker,))  # after all of early: see test_cancel_drops_late_chunks
    assert wait_terminal(rx, "marker") is S.DONE
    wait_terminal(tx, "early")
    assert not cache.kv[:, 1:].any()
    blocks = {"early": [9, 4, 30]}
    rx.expect("early", blocks["early"])
    assert rx.poll("early") is S.DONE, rx.error("early")
    _assert_landed(cache, blocks, (early,))


def test_sender_closing_mid_request_fails_it_on_the_receiver(endpoints, kind):
    tx, rx, cache = endpoints()
    rx.expect("open", [0, 1])
    tx.send("open", 0, 0, pages_for(LAYOUT, "open", 2)[0])
    wait_until(lambda: rx.poll("open") is S.TRANSFERRING, what="first chunk")
    tx.close()
    if kind == "loopback":  # no link to lose in-process: the request just stays open
        assert rx.poll("open") is S.TRANSFERRING
        return
    assert wait_terminal(rx, "open") is S.FAILED
    why = {"grpc": "stream closed before its end marker"}.get(kind, "sender closed the connection without finishing")
    assert rx.error("open") == f"request 'open': transfer stream broke: {why}"  # not just the id
