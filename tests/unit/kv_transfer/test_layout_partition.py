"""The KV layout handshake carries the head partition (KVLayout.kv_head_start / total_kv_heads,
protos LayoutMsg fields 6-7): a gRPC peer without those fields means every head, and a sender
and receiver whose partitions differ are refused with both partitions named (workers exchange
whole-head pages; resharding happens at a tensor-parallel worker's edge, not in a transport)."""

from __future__ import annotations

import pytest

from engine.kv_cache.layout import KVLayout, KVLayoutMismatch
from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer import make_receiver, make_sender
from kv_transfer.grpc_transport import _layout_from, _layout_msg
from protos import kv_transfer_pb2 as pb

WHOLE = KVLayout("float32", block_size=4, num_layers=2, num_kv_heads=4, head_dim=8)


@pytest.mark.parametrize("layout", [WHOLE, WHOLE.tp_shard(0, 2), WHOLE.tp_shard(1, 2), WHOLE.tp_shard(3, 4)])
def test_layout_msg_carries_the_partition_both_ways(layout: KVLayout) -> None:
    msg = _layout_msg(layout)
    assert (msg.kv_head_start, msg.total_kv_heads) == (
        layout.kv_head_start,
        0 if layout.is_whole else layout.model_kv_heads,
    )
    wire = pb.LayoutMsg.FromString(msg.SerializeToString())
    assert _layout_from(wire) == layout


def test_an_older_peer_without_partition_fields_holds_every_head() -> None:
    old = pb.LayoutMsg(dtype="float32", block_size=4, num_layers=2, num_kv_heads=4, head_dim=8)  # fields 1-5 only
    got = _layout_from(pb.LayoutMsg.FromString(old.SerializeToString()))
    assert got == WHOLE and got.is_whole and list(got.heads) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["loopback", "shm", "grpc"])
def test_mismatched_partitions_are_refused_naming_both(kind: str) -> None:
    shard = WHOLE.tp_shard(1, 2)
    rx = make_receiver(kind, WHOLE, PagedKVCache(WHOLE, 4))
    tx = make_sender(kind, shard)
    same = make_sender(kind, WHOLE)
    try:
        with pytest.raises(KVLayoutMismatch) as e:
            tx.connect(rx.address)
        msg = str(e.value)
        assert "heads [2, 4) of 4" in msg and "heads [0, 4) of 4" in msg, msg
        assert "num_kv_heads" in msg and "kv_head_start" in msg, msg
        same.connect(rx.address)  # the receiver still takes a whole-head sender
    finally:
        for endpoint in (tx, same, rx):
            endpoint.close()


def test_a_receiver_holding_a_partition_accepts_the_same_partition_only() -> None:
    shard = WHOLE.tp_shard(0, 2)
    rx = make_receiver("grpc", shard, PagedKVCache(shard, 4))
    ok, other = make_sender("grpc", shard), make_sender("grpc", WHOLE.tp_shard(1, 2))
    try:
        ok.connect(rx.address)
        with pytest.raises(
            KVLayoutMismatch, match=r"kv_head_start: 2 != 0.*heads \[2, 4\) of 4 vs heads \[0, 2\) of 4"
        ):
            other.connect(rx.address)
    finally:
        for endpoint in (ok, other, rx):
            endpoint.close()
