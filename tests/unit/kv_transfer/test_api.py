"""Factory, checksum and sender-side argument checks (loopback: no transport noise)."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache.layout import KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer import KVTransferError, TransferStatus, make_receiver, make_sender, tensor_checksum
from tests.unit.kv_transfer.kvt_helpers import LAYOUT, pages_for, wait_terminal


@pytest.fixture
def pair():
    rx = make_receiver("loopback", LAYOUT, PagedKVCache(LAYOUT, 8))
    tx = make_sender("loopback", LAYOUT)
    tx.connect(rx.address)
    yield tx, rx
    tx.close()
    rx.close()


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown KV transport kind 'rdma'.*grpc.*loopback.*shm.*torch"):
        make_sender("rdma", LAYOUT)
    with pytest.raises(ValueError, match="unknown KV transport kind"):
        make_receiver("rdma", LAYOUT, PagedKVCache(LAYOUT, 1))


def test_receiver_refuses_a_cache_with_another_layout():
    other = PagedKVCache(LAYOUT.__class__("float32", 4, 3, 2, 8), 2)
    with pytest.raises(KVLayoutMismatch, match="dtype"):
        make_receiver("loopback", LAYOUT, other)


def test_checksum_sees_flips_swaps_and_truncation():
    t = pages_for(LAYOUT, "x", 2)
    base = tensor_checksum(t)
    raw = t.clone().view(-1).view(torch.uint8)
    raw[100] ^= 0x80
    assert tensor_checksum(raw) != base
    raw = t.clone().view(-1).view(torch.uint8)
    assert tensor_checksum(raw[:-1]) != base
    assert tensor_checksum(torch.flip(t, dims=[0])) != base
    assert tensor_checksum(t.clone()) == base


def test_send_validates_arguments(pair):
    tx, _ = pair
    page = pages_for(LAYOUT, "x", 1)[0]  # [1, 2, bs, Hkv, D]
    with pytest.raises(ValueError, match="layer"):
        tx.send("x", LAYOUT.num_layers, 0, page)
    with pytest.raises(ValueError, match="first_page"):
        tx.send("x", 0, -1, page)
    with pytest.raises(ValueError, match="pages must be"):
        tx.send("x", 0, 0, page[0])
    with pytest.raises(ValueError, match="dtype"):
        tx.send("x", 0, 0, page.float())


def test_finish_count_and_send_after_finish(pair):
    tx, rx = pair
    page = pages_for(LAYOUT, "x", 1)[0]
    tx.send("x", 0, 0, page)
    with pytest.raises(KVTransferError, match="1 chunks were sent"):
        tx.finish("x", 2)
    tx.finish("x", 1)
    with pytest.raises(KVTransferError, match="after its finish"):
        tx.send("x", 1, 0, page)
    assert wait_terminal(tx, "x") is TransferStatus.DONE
    with pytest.raises(KeyError):
        tx.poll("never-sent")


def test_send_before_connect_and_after_close():
    tx = make_sender("loopback", LAYOUT)
    page = pages_for(LAYOUT, "x", 1)[0]
    with pytest.raises(KVTransferError, match="not connected"):
        tx.send("x", 0, 0, page)
    tx.close()
    with pytest.raises(KVTransferError, match="closed"):
        tx.send("x", 0, 0, page)


def test_shm_refuses_a_chunk_larger_than_its_arena():
    rx = make_receiver("shm", LAYOUT, PagedKVCache(LAYOUT, 8), arena_bytes=2 * LAYOUT.page_bytes)
    tx = make_sender("shm", LAYOUT)
    try:
        tx.connect(rx.address)
        with pytest.raises(ValueError, match="exceeds"):
            tx.send("x", 0, 0, pages_for(LAYOUT, "x", 3)[0])
    finally:
        tx.close()
        rx.close()
