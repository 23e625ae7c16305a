"""The attention group's KV-transfer control messages (dist_transport.py EXPECT / POLL / CANCEL /
ADDRESS, shard_kv.py): over a real gloo group, a sender pushes a request's pages straight into
an attention worker's receiver, which writes them at the page ids the model worker named;
the model worker sees the transfer's state through POLL; refusals and checksum failures come
back FAILED with their reason; CANCEL forgets a request (a late chunk is dropped unwritten)."""

from __future__ import annotations

import time

import pytest
import torch

from attention_offload.build import shard_layout
from attention_offload.dist_transport import DistAttentionTransport, decode_strings, encode_strings, query_kv_addresses
from attention_offload.remote import RemoteAttentionBackend
from attention_offload.shard_kv import FAILED_CODE, TRANSFER_STATES
from attention_offload.worker import build_attention_worker
from decode_worker.attention_receiver import AttentionKVReceiver
from engine.llm import build_engine_config
from kv_transfer import ReceiverFactory, TransferStatus, make_sender
from tests.kv_faults import flipped
from tests.unit.attention_offload.test_attention_offload import BLOCK
from tests.unit.attention_offload.test_attention_worker import BLOCKS, _join, dense  # noqa: F401 - fixture

CODE = {s: TRANSFER_STATES.index(s.value) for s in TransferStatus}
DEADLINE_S = 30.0


def _settled(t: DistAttentionTransport, rid: str) -> tuple[int, str | None]:
    """Polls shard 0 until ``rid``'s transfer is DONE or FAILED (the sender's thread delivers
    the chunks), within the deadline."""
    end = time.monotonic() + DEADLINE_S
    while True:
        ((code, why),) = t.kv_poll(0, [rid])
        if TRANSFER_STATES[code] in ("done", "failed") or time.monotonic() > end:
            return code, why
        time.sleep(0.005)  # poll interval


def test_wire_states_are_the_transfer_states_and_strings_round_trip():
    assert TRANSFER_STATES == tuple(s.value for s in TransferStatus)
    assert TRANSFER_STATES[FAILED_CODE] == TransferStatus.FAILED.value
    items = ["r-1", "", "ünïcode/42"]
    assert decode_strings(torch.tensor(encode_strings(items))) == items


def test_control_messages_drive_the_attention_workers_receiver(dense):  # noqa: F811 - the fixture
    w = [
        build_attention_worker(
            dense,
            {"num_blocks": BLOCKS, "block_size": BLOCK},
            f"attention-{i}",
            backend="sdpa",
            receiver_factory=ReceiverFactory("loopback") if i == 0 else None,
        )
        for i in range(2)
    ]
    comm = _join(w, timeout_s=30.0)
    layout = w[0].shard.layout
    t = DistAttentionTransport(None, [1, 2], layout)
    addresses = query_kv_addresses(comm, t.ranks)  # at join, before the transport is connected
    t.connect(comm)
    try:
        assert addresses == [w[0].kv.address, None] and isinstance(addresses[0], str)
        pages = [5, 2, 9]  # the shard's page ids for the request's 3 pages
        t.kv_expect(0, "r", pages)
        t.kv_expect(0, "dup", [1])
        t.kv_expect(0, "dup", [3])  # refused (already expected): the request fails, loudly
        t.kv_expect(1, "nowhere", [0])  # refused: worker 1 has no receiver
        (r, (dup, dup_why)) = t.kv_poll(0, ["r", "dup"])
        assert r == (CODE[TransferStatus.BOOTSTRAPPING], None)
        assert dup == FAILED_CODE and "refused the transfer" in dup_why and "already expected" in dup_why
        ((code, why),) = t.kv_poll(1, ["nowhere"])
        assert code == FAILED_CODE and "attention-1 has no KV receiver" in why
        sender = make_sender("loopback", layout)
        sender.connect(addresses[0])
        data = torch.randn(layout.num_layers, 3, *layout.page_shape, dtype=layout.torch_dtype)
        for layer in range(layout.num_layers):
            sender.send("r", layer, 0, data[layer].clone())
        sender.finish("r", layout.num_layers)
        assert _settled(t, "r") == (CODE[TransferStatus.DONE], None)
        assert torch.equal(w[0].shard.cache.kv[:, pages], data)  # written at the named pages
        assert w[0].stats().kv_bytes_received == 3 * layout.num_layers * layout.page_bytes
        # a corrupted chunk fails its request at the receiver's checksum, with the reason
        bad = make_sender("loopback", layout, fault_hook=flipped)
        bad.connect(addresses[0])
        t.kv_expect(0, "bad", [7])
        bad.send("bad", 0, 0, data[0, :1].clone())
        code, why = _settled(t, "bad")
        assert code == FAILED_CODE and "checksum mismatch" in why
        for rid in ("r", "dup", "bad"):
            t.kv_cancel(0, rid)
        ((code, why),) = t.kv_poll(0, ["r"])  # forgotten
        assert code == FAILED_CODE and "not expected by attention-0" in why
        for x in (sender, bad):
            x.close()
    finally:
        t.close()
    for x in w:
        assert x.wait_stopped(10.0) and x.stats().state == "closed"
        x.shutdown()


def test_the_model_workers_proxy_needs_every_attention_workers_address(dense):  # noqa: F811 - the fixture
    """decode_worker/attention_receiver.py: no address before the group formed, none for a worker
    built without a receiver: start_transfer refuses, naming it, before holding anything."""
    layout = shard_layout(build_engine_config(dense, block_size=BLOCK))
    t = DistAttentionTransport(None, [1, 2], layout)
    proxy = AttentionKVReceiver(layout, RemoteAttentionBackend(t, [4, 4], BLOCK), t)
    assert proxy.address is None and proxy.bytes_received == 0
    with pytest.raises(RuntimeError, match="not known yet"):
        proxy.address_of(0)
    proxy.set_addresses(["rx-1", None])
    with pytest.raises(RuntimeError, match=r"ranks \[2\]\) have no KV receiver"):
        proxy.check_ready()
    with pytest.raises(ValueError, match="1 KV addresses for 2 attention workers"):
        proxy.set_addresses(["rx-1"])
    proxy.set_addresses(["rx-1", ("10.0.0.2", 5555)])
    assert [proxy.address_of(s) for s in (0, 1)] == ["rx-1", ("10.0.0.2", 5555)]
    with pytest.raises(KeyError, match="not expected"):
        proxy.poll("never")
    proxy.cancel("never")  # idempotent: nothing sent for a request never expected
    assert t.counters.control == 0
