"""DecodeWorker without Ray: reserve-before-bytes, FIFO reservation queue, timeouts, local prefill."""

from __future__ import annotations

import time

import pytest

from decode_worker.build import build_decode_worker
from engine import LLM, SamplingParams
from engine.types import EngineStopped, FirstToken, RequestSpec
from kv_transfer import make_sender

ENGINE = {"block_size": 4, "num_blocks": 16, "max_num_batched_tokens": 16}
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture
def model(tiny_checkpoint):
    return tiny_checkpoint("llama")


def _drain(w, rid, cursor=0):
    tokens = []
    while True:
        c = w.read(rid, cursor, timeout=10)
        tokens += c.token_ids
        cursor += len(c.token_ids)
        if c.finished:
            return tokens, c


def test_local_prefill_matches_llm(model):
    w = build_decode_worker(model, ENGINE, transport=None)
    try:
        prompt = list(range(5, 25))
        w.generate_local(RequestSpec("r", prompt, PARAMS))
        tokens, last = _drain(w, "r")
        assert tokens == LLM(model, **ENGINE).generate([prompt], PARAMS)[0].token_ids
        assert last.finish_reason == "length"
        stats = w.stats()
        assert stats.engine.free_kv_blocks == ENGINE["num_blocks"]
        # the local prefill was queued once (queue time), no KV reservation was waited for
        assert stats.queue_seconds.count == 1 and stats.reserve_wait_seconds.count == 0
    finally:
        w.shutdown()


def test_transfer_timeout_fails_request_and_frees_blocks(model):
    w = build_decode_worker(model, ENGINE, transport="loopback", transfer_timeout_s=0.2)
    try:
        w.start_transfer(RequestSpec("r", list(range(20)), PARAMS))
        assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"] - 5  # reserved before any byte
        tokens, last = _drain(w, "r")  # no sender ever connects
        assert tokens == [] and last.finish_reason == "abort" and "timed out" in last.error
        assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    finally:
        w.shutdown()


def test_reservations_queue_fifo_when_pool_is_full(model):
    w = build_decode_worker(model, ENGINE, transport="loopback")
    try:
        big = list(range(3, 43))  # 40 tokens = 10 of 16 blocks
        w.start_transfer(RequestSpec("a", big, PARAMS))
        w.start_transfer(RequestSpec("b", big, PARAMS))
        assert w.stats().engine.free_kv_blocks == 6  # "b" waits for room, holding nothing
        assert w.stats().reserve_wait_seconds.count == 1  # only "a" got blocks so far
        w.abort("a")
        assert w.stats().engine.free_kv_blocks == 6  # "a"'s blocks went to "b"
        assert w.stats().reserve_wait_seconds.count == 2
        w.abort("b")
        assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    finally:
        w.shutdown()


def test_transferred_request_decodes_from_received_kv(model):
    """Prefill colocated in an LLM, ship its pages by hand, check the decode continues exactly."""
    llm = LLM(model, **ENGINE, enable_prefix_caching=False)
    prompt = list(range(30, 50))
    expected = llm.generate([prompt], PARAMS)[0].token_ids
    # recompute the prompt's KV in a prefill-only pass of the same engine
    eng = llm.engine
    req = llm.make_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    eng.add_request(req)
    blocks = {}

    def keep(layer, out):
        blocks[layer] = eng.cache.kv[layer, out.scheduled[0].block_ids]

    while not req.is_finished:
        eng.step(keep)
    w = build_decode_worker(model, ENGINE, transport="loopback")
    try:
        spec = RequestSpec("r", prompt, PARAMS)
        w.start_transfer(spec)
        sender = make_sender("loopback", w.engine.layout)
        sender.connect(w.kv_address())
        for layer, pages in blocks.items():
            sender.send("r", layer, 0, pages)
        sender.finish("r", len(blocks))
        prefilled_at = time.time() - 0.25  # the prefill "ended" 250 ms ago
        w.set_first_token("r", FirstToken(req.output_token_ids[0], None, 0, prefilled_at))
        tokens, last = _drain(w, "r")
        assert tokens == expected and last.finish_reason == "length"
        assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
        # the hand-off, measured once: from the prefill's end to the request's first decode step
        handoff = w.stats().handoff_seconds
        assert handoff.count == 1 and 0.25 <= handoff.sum < time.time() - prefilled_at
    finally:
        w.shutdown()


def test_engine_crash_fails_open_streams_instead_of_hanging(model):
    w = build_decode_worker(model, ENGINE, transport=None)

    def boom(*_a, **_k):
        raise RuntimeError("injected step failure")

    try:
        w.engine.step = boom
        w.generate_local(RequestSpec("r", list(range(5, 15)), PARAMS))
        tokens, last = _drain(w, "r")
        assert tokens == [] and last.finish_reason == "abort" and "injected step failure" in last.error
        with pytest.raises(EngineStopped, match="engine loop stopped"):
            w.ping()
    finally:
        w.shutdown()


def test_a_request_ended_by_its_first_token_leaves_no_handoff_pending(model):
    """max_tokens=1: admission finishes the request (it never decodes here), so no hand-off is
    measured for it and nothing waits for its first decode step."""
    w = build_decode_worker(model, ENGINE, transport="loopback")
    try:
        prompt = list(range(30, 50))
        w.start_transfer(RequestSpec("one", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
        sender = make_sender("loopback", w.engine.layout)
        sender.connect(w.kv_address())
        pages = -(-len(prompt) // w.engine.layout.block_size)
        layers = w.engine.layout.num_layers
        for layer in range(layers):  # any bytes: the request ends before they are attended to
            sender.send("one", layer, 0, w.engine.cache.kv[layer, :pages].clone())
        sender.finish("one", layers)
        w.set_first_token("one", FirstToken(7, None, 0, time.time()))
        tokens, last = _drain(w, "one")
        assert tokens == [7] and last.finish_reason == "length"
        assert w.loop.run(lambda: dict(w._handoff_from)) == {}
        assert w.stats().handoff_seconds.count == 0
        assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    finally:
        w.shutdown()
