"""ReceiverBook state machine, driven directly (no transport)."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer import KVChunk, KVTransferError, TransferStatus
from kv_transfer.receiver_book import ReceiverBook
from tests.unit.kv_transfer.kvt_helpers import LAYOUT, pages_for

S = TransferStatus


def _book(max_unexpected_bytes: int = 1 << 20) -> tuple[ReceiverBook, PagedKVCache]:
    cache = PagedKVCache(LAYOUT, 16)
    return ReceiverBook(LAYOUT, cache, max_unexpected_bytes), cache


def _all_layers(rid: str, first: int, src: torch.Tensor) -> list[KVChunk]:
    # src: [L, n, 2, bs, Hkv, D]
    return [KVChunk.seal(rid, layer, first, src[layer]) for layer in range(LAYOUT.num_layers)]


def test_states_bootstrapping_transferring_done_and_cache_contents():
    book, cache = _book()
    src = pages_for(LAYOUT, "a", 3)
    book.expect("a", [9, 2, 5])
    assert book.poll("a") is S.BOOTSTRAPPING
    chunks = _all_layers("a", 0, src[:, :2]) + _all_layers("a", 2, src[:, 2:])
    for c in chunks:
        book.on_chunk(c)
        assert book.poll("a") is S.TRANSFERRING  # no finish yet
    book.on_finish("a", len(chunks))
    assert book.poll("a") is S.DONE and book.error("a") is None
    assert torch.equal(cache.kv[:, [9, 2, 5]], src)


def test_finish_before_chunks_waits_for_the_promised_count():
    book, _ = _book()
    src = pages_for(LAYOUT, "a", 1)
    book.expect("a", [0])
    book.on_finish("a", 3)
    chunks = _all_layers("a", 0, src)
    for c in chunks[:2]:
        book.on_chunk(c)
    assert book.poll("a") is S.TRANSFERRING
    book.on_chunk(chunks[2])
    assert book.poll("a") is S.DONE


def test_missing_layer_fails_instead_of_done():
    book, _ = _book()
    src = pages_for(LAYOUT, "a", 2)
    book.expect("a", [0, 1])
    for c in _all_layers("a", 0, src)[:-1]:  # last layer never sent
        book.on_chunk(c)
    book.on_finish("a", LAYOUT.num_layers - 1)
    assert book.poll("a") is S.FAILED
    assert f"layers [{LAYOUT.num_layers - 1}]" in book.error("a")


def test_more_chunks_than_promised_fails():
    book, _ = _book()
    book.expect("a", [0])
    chunks = _all_layers("a", 0, pages_for(LAYOUT, "a", 1))
    for c in chunks:
        book.on_chunk(c)
    book.on_finish("a", len(chunks) - 1)
    assert book.poll("a") is S.FAILED and "over-long stream" in book.error("a")


def _flip_byte(c: KVChunk) -> None:
    raw = c.payload.view(-1).view(torch.uint8)
    raw[7] ^= 0x10


def _truncate(c: KVChunk) -> None:
    c.payload = c.payload.reshape(-1).view(torch.uint8)[:-1]


def _extend(c: KVChunk) -> None:
    c.payload = torch.cat([c.payload.reshape(-1).view(torch.uint8), torch.zeros(2, dtype=torch.uint8)])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_flip_byte, "checksum mismatch"),
        (_truncate, "truncated chunk"),
        (_extend, "over-long chunk"),
        (lambda c: setattr(c, "first_page", 1), "outside the 2 reserved blocks"),
        (lambda c: setattr(c, "layer", LAYOUT.num_layers), "layout has 3 layers"),
    ],
    ids=["flipped-byte", "truncated", "over-long", "page-range", "layer-range"],
)
def test_bad_chunk_fails_and_is_not_written(mutate, message):
    book, cache = _book()
    src = pages_for(LAYOUT, "a", 2)
    book.expect("a", [3, 4])
    chunk = KVChunk.seal("a", 0, 0, src[0].clone())
    mutate(chunk)  # after sealing: the checksum describes the original bytes
    book.on_chunk(chunk)
    assert book.poll("a") is S.FAILED
    assert message in book.error("a")
    assert not cache.kv.any(), "a rejected chunk must not touch the cache"
    book.on_chunk(KVChunk.seal("a", 1, 0, src[1]))  # later good chunks are not written either
    assert not cache.kv.any() and book.poll("a") is S.FAILED


def test_chunks_before_expect_are_buffered_and_replayed():
    book, cache = _book()
    src = pages_for(LAYOUT, "a", 2)
    chunks = _all_layers("a", 0, src)
    for c in chunks:
        book.on_chunk(c)
    book.on_finish("a", len(chunks))
    assert not cache.kv.any()
    with pytest.raises(KeyError):
        book.poll("a")
    book.expect("a", [7, 1])
    assert book.poll("a") is S.DONE
    assert torch.equal(cache.kv[:, [7, 1]], src)


def test_buffered_chunk_is_a_copy_of_a_borrowed_payload():
    book, cache = _book()
    src = pages_for(LAYOUT, "a", 1)
    borrowed = src[0].clone()
    book.on_chunk(KVChunk.seal("a", 0, 0, borrowed))
    borrowed.zero_()  # the transport reuses its buffer after on_chunk returns
    book.expect("a", [0])
    assert torch.equal(cache.kv[0, [0]], src[0])


def test_early_buffer_overflow_dooms_the_request_loudly():
    book, cache = _book(max_unexpected_bytes=LAYOUT.page_bytes)
    src = pages_for(LAYOUT, "a", 2)
    book.on_chunk(KVChunk.seal("a", 0, 0, src[0]))  # 2 pages > 1-page buffer
    book.expect("a", [0, 1])
    assert book.poll("a") is S.FAILED and "early buffer" in book.error("a")
    assert not cache.kv.any()


def test_cancel_drops_state_and_late_chunks():
    book, cache = _book()
    src = pages_for(LAYOUT, "a", 1)
    book.expect("a", [5])
    book.on_chunk(KVChunk.seal("a", 0, 0, src[0]))
    book.cancel("a")
    with pytest.raises(KeyError):
        book.poll("a")
    book.on_chunk(KVChunk.seal("a", 1, 0, src[1]))
    book.on_finish("a", 3)
    assert not cache.kv[1:].any(), "late chunk after cancel was written"
    book.expect("a", [6])  # the id may be reused after cancel
    assert book.poll("a") is S.BOOTSTRAPPING


def test_ack_after_the_receiver_forgot_a_done_transfer_is_ok():
    """The decode worker admits a DONE request and cancel()s its bookkeeping; a sender's ack
    built after that must still say the transfer succeeded (it did), while a request cancelled
    before it was DONE is acked as cancelled."""
    book, _ = _book()
    src = pages_for(LAYOUT, "done", 1)
    book.expect("done", [3])
    chunks = _all_layers("done", 0, src)
    for c in chunks:
        book.on_chunk(c)
    book.on_finish("done", len(chunks))
    book.cancel("done")  # admitted: the worker forgets the transfer
    assert book.status_for_ack("done") == (True, "done")
    book.expect("cut", [4])
    book.on_chunk(KVChunk.seal("cut", 0, 0, src[0]))
    book.cancel("cut")  # aborted mid-transfer
    ok, message = book.status_for_ack("cut")
    assert not ok and message == "request 'cut' was cancelled by the receiver"


def test_stream_error_fails_expected_and_dooms_unexpected():
    book, _ = _book()
    book.expect("a", [0])
    book.on_stream_error({"a", "b"}, "peer vanished")
    assert book.poll("a") is S.FAILED and "peer vanished" in book.error("a")
    book.expect("b", [1])
    assert book.poll("b") is S.FAILED and "peer vanished" in book.error("b")


def test_expect_validates_block_ids_and_duplicates():
    book, _ = _book()
    with pytest.raises(ValueError, match=r"block ids must be unique and in \[0, 16\)"):
        book.expect("a", [0, 0])
    with pytest.raises(ValueError, match=r"block ids must be unique and in \[0, 16\)"):
        book.expect("a", [16])
    with pytest.raises(ValueError, match="no destination blocks"):
        book.expect("a", [])
    book.expect("a", [0])
    with pytest.raises(KVTransferError, match="already expected"):
        book.expect("a", [1])


def test_on_terminal_is_called_once_per_request_that_ends():
    cache = PagedKVCache(LAYOUT, 16)
    ended: list[str] = []
    book = ReceiverBook(LAYOUT, cache, 1 << 20, on_terminal=lambda: ended.append("x"))
    src = pages_for(LAYOUT, "a", 1)
    book.expect("a", [0])
    chunks = _all_layers("a", 0, src)
    for c in chunks:
        book.on_chunk(c)
    assert ended == []  # transferring: nothing to tell yet
    book.on_finish("a", len(chunks))
    assert book.poll("a") is S.DONE and ended == ["x"]
    book.expect("b", [1])
    book.on_finish("b", 0)  # a finish with no chunk: FAILED
    assert book.poll("b") is S.FAILED and ended == ["x", "x"]
