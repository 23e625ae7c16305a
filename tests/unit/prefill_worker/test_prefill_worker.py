"""PrefillWorker without Ray: layer-wise push order, page contents, prefix hits, release."""

from __future__ import annotations

import time

import pytest
import torch

from engine import SamplingParams
from engine.request import RequestStatus
from engine.types import KV_TRANSFER_FAILED, PeerUnreachable, RequestSpec
from kv_transfer.base import KVLinkBroken, KVSender, TransferStatus
from prefill_worker.build import build_prefill_worker

ENGINE = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 8}
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class RecordingSender(KVSender):
    """Keeps every chunk; DONE once finish() was called and ``hold`` is cleared.

    ``log`` is shared with the model probe."""

    def __init__(self, layout, log):
        super().__init__(layout)
        self.log = log
        self.chunks: dict[str, list] = {}
        self.finished: dict[str, int] = {}
        self.hold = True
        self.broken: str | None = None  # set by a test: the receiver "died"
        self.closed = False

    refuse = False  # set by a test: no receiver listens at the peer's address

    def connect(self, peer):
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        self.peer = peer

    fail_sends_to: str | None = None  # set by a test: sends to this peer raise (its link broke)

    def send(self, request_id, layer, first_page, pages):
        if self.fail_sends_to is not None and self.peer == self.fail_sends_to:
            raise KVLinkBroken("link is broken: receiver connection lost: ConnectionResetError")
        self.log.append(("send", layer))
        self.chunks.setdefault(request_id, []).append((layer, first_page, pages.clone()))

    def finish(self, request_id, num_chunks):
        self.finished[request_id] = num_chunks

    def poll(self, request_id):
        return TransferStatus.DONE if request_id in self.finished and not self.hold else TransferStatus.TRANSFERRING

    def error(self, request_id):
        return None

    @property
    def link_error(self):
        return self.broken

    def close(self):
        self.closed = True


def _logged(fn, log, entry):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        log.append(entry)
        return out

    return wrapper


@pytest.fixture
def worker_and_log(tiny_checkpoint):
    log: list = []
    w = build_prefill_worker(tiny_checkpoint("llama"), ENGINE, transport="loopback", worker_id="p")
    w._sender_factory = lambda: RecordingSender(w.engine.layout, log)
    # probe: record when each layer's MLP runs, to check sends interleave with compute. Both the
    # torch path (mlp.forward) and the native-kernel path (mlp.forward_native) are wrapped, so the
    # probe sees the MLP whichever path this machine's CPU takes.
    for i, layer in enumerate(w.engine.model.layers):
        for name in ("forward", "forward_native"):
            setattr(layer.mlp, name, _logged(getattr(layer.mlp, name), log, ("mlp", i)))
    yield w, log
    w.shutdown()


def _sender(w) -> RecordingSender:
    return next(iter(w._senders.values()))


def test_layer_k_is_pushed_before_layer_k_plus_1_is_computed(worker_and_log):
    w, log = worker_and_log
    prompt = list(range(10, 30))  # 20 tokens, budget 8 -> 3 chunks
    before = time.time()
    first = w.prefill(RequestSpec("r", prompt, PARAMS), "decode-addr")
    assert len(first.token_ids) == 1
    assert before <= first.prefilled_at <= time.time()  # the hand-off's start, for the decode worker
    layers = w.engine.layout.num_layers
    # every step: mlp 0, send 0, mlp 1, send 1, ... (transfer overlaps the next layers' compute)
    step = [e for i in range(layers) for e in (("mlp", i), ("send", i))]
    assert log == step * 3
    assert _sender(w).finished["r"] == 3 * layers


def test_pushed_pages_equal_the_cache(worker_and_log):
    w, _ = worker_and_log
    prompt = list(range(40, 63))  # 23 tokens: 6 pages, the last partly filled
    w.prefill(RequestSpec("r", prompt, PARAMS), "decode-addr")
    got = w.engine.block_ids("r")
    assert len(got) == 6, "blocks must stay held until the sender reports DONE"
    assert w.engine.scheduler.prefilled["r"].status == RequestStatus.PREFILLED
    per_layer: dict[int, dict[int, torch.Tensor]] = {}
    for layer, first, pages in _sender(w).chunks["r"]:
        for j in range(pages.shape[0]):
            per_layer.setdefault(layer, {})[first + j] = pages[j]  # later chunks overwrite partial pages
    assert sorted(per_layer) == list(range(w.engine.layout.num_layers)), "a layer was never sent"
    for layer, pages in per_layer.items():
        assert sorted(pages) == list(range(len(got)))
        expected = w.engine.cache.kv[layer, got]
        assert torch.equal(torch.stack([pages[i] for i in range(len(got))]), expected)


def test_prefix_cache_hit_still_sends_every_page(worker_and_log):
    w, _ = worker_and_log
    shared = list(range(100, 116))  # 4 full blocks
    w.prefill(RequestSpec("a", shared + [7, 8, 9], PARAMS), "decode-addr")
    first = w.prefill(RequestSpec("b", shared + [5, 6], PARAMS), "decode-addr")
    assert first.num_cached_tokens == 16
    pages = {(layer, first + j) for layer, first, p in _sender(w).chunks["b"] for j in range(p.shape[0])}
    assert {p for (layer, p) in pages if layer == 0} == set(range(5))


def test_blocks_released_once_sender_done(worker_and_log):
    w, _ = worker_and_log
    w.prefill(RequestSpec("r", list(range(20)), PARAMS), "decode-addr")
    w.loop.run(w._tick)
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"] - 5  # 5 pages held while the transfer runs
    _sender(w).hold = False
    w.loop.run(w._tick)
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    assert w.engine.scheduler.prefilled == {}


def test_whole_cache_mode_sends_after_the_prompt(tiny_checkpoint):
    log: list = []
    w = build_prefill_worker(tiny_checkpoint("llama"), ENGINE, transport="loopback", layerwise=False)
    w._sender_factory = lambda: RecordingSender(w.engine.layout, log)
    try:
        w.prefill(RequestSpec("r", list(range(20)), PARAMS), "x")
        layers = w.engine.layout.num_layers
        assert [c[0] for c in _sender(w).chunks["r"]] == list(range(layers))
        assert all(c[1] == 0 and c[2].shape[0] == 5 for c in _sender(w).chunks["r"])
    finally:
        w.shutdown()


def test_bad_request_raises_and_holds_nothing(worker_and_log):
    w, _ = worker_and_log
    with pytest.raises(ValueError, match="vocabulary"):
        w.prefill(RequestSpec("bad", [1, 10**7], PARAMS), "x")
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]


def test_blocks_sent_by_reference_stay_pinned_until_the_transfer_settles(worker_and_log):
    w, _ = worker_and_log
    w.prefill(RequestSpec("r", list(range(20)), PARAMS), "decode-addr")  # 5 full pages
    blocks = w.engine.block_ids("r")
    pool = w.engine.pool
    # the request's own reference plus one pin: freeing the request (a preemption, say)
    # would not return them to the free list while the receiver may still read them
    assert [pool.ref_counts[b] for b in blocks] == [2] * len(blocks)
    _sender(w).hold = False
    w.loop.run(w._tick)
    assert [pool.ref_counts[b] for b in blocks] == [0] * len(blocks)
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]


def test_abort_during_the_transfer_unpins_and_frees_everything(worker_and_log):
    w, _ = worker_and_log
    w.prefill(RequestSpec("r", list(range(20)), PARAMS), "decode-addr")
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"] - 5
    w.abort("r")  # sender never reports DONE (hold stays set)
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]


def test_a_sender_whose_receiver_died_is_closed_and_replaced(worker_and_log):
    w, _ = worker_and_log
    w.prefill(RequestSpec("r", list(range(20)), PARAMS), "decode-addr")
    old = _sender(w)
    old.broken = "EOFError: receiver closed the connection"
    w.loop.run(w._tick)
    assert not old.closed, "request r still polls it"
    # a new request to the same address reconnects instead of failing on the dead link
    w.prefill(RequestSpec("s", list(range(30, 50)), PARAMS), "decode-addr")
    new = _sender(w)
    assert old.closed and new is not old and "s" in new.chunks
    # with nothing polling it any more, a dead sender is closed on the next tick
    new.broken = "EOFError"
    w.abort("s")
    w.loop.run(w._tick)
    assert new.closed and w._senders == {}


def test_an_unreachable_decode_worker_is_a_typed_error_and_holds_nothing(worker_and_log, monkeypatch):
    w, _ = worker_and_log
    monkeypatch.setattr(RecordingSender, "refuse", True)
    with pytest.raises(PeerUnreachable, match="no KV link to gone-addr: ConnectionRefusedError"):
        w.prefill(RequestSpec("r", list(range(20)), PARAMS), "gone-addr")
    assert w._senders == {} and w._out == {}
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    assert w.stats().engine.running_requests == w.stats().engine.waiting_requests == 0
    assert w.stats().pending_requests == 0
    # the next request, to a reachable receiver, is served
    monkeypatch.setattr(RecordingSender, "refuse", False)
    assert len(w.prefill(RequestSpec("s", list(range(20)), PARAMS), "decode-addr").token_ids) == 1


def test_a_broken_link_fails_its_request_alone_and_the_worker_goes_on(worker_and_log, monkeypatch):
    """A receiver dies mid-transfer: sends to it raise. Only the requests going there fail
    (a KV-transfer error on their stream, blocks freed); the engine loop and a request to
    another receiver in the same steps are unaffected."""
    w, _ = worker_and_log
    monkeypatch.setattr(RecordingSender, "fail_sends_to", "dead-addr")

    def both():  # on the loop thread: prefilled in the same steps
        return (
            w._add(RequestSpec("gone", list(range(20)), PARAMS), "dead-addr", ()),
            w._add(RequestSpec("ok", list(range(30, 50)), PARAMS), "live-addr", ()),
        )

    gone, ok = w.loop.run(both)
    failed, served = gone.read(0, 30), ok.read(0, 30)
    assert failed.error is not None and failed.error.startswith(KV_TRANSFER_FAILED) and failed.token_ids == []
    assert "link is broken" in failed.error
    assert served.error is None and len(served.token_ids) == 1
    assert w.loop.error is None and w.stats().transfer_failures == 1
    live = w._senders["live-addr"]
    live.hold = False
    w.loop.run(w._tick)
    assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"] and w._out == {} and w._releasing == {}
