"""Failover continuations on the workers: a request resumed with the tokens it already generated
(``emitted``) continues exactly as the uninterrupted request would, locally and through a
transfer; stop strings, max_tokens and seeded sampling continue across the cut; the workers'
request bounds refuse with queue.Full."""

from __future__ import annotations

import queue

import pytest

from decode_worker.build import build_decode_worker
from engine import LLM, SamplingParams
from engine.types import FirstToken, RequestSpec
from prefill_worker.build import build_prefill_worker

ENGINE = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 16}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = list(range(7, 30))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama")


def _drain(w, rid, cursor):
    tokens = []
    while True:
        c = w.read(rid, cursor, timeout=10)
        tokens += c.token_ids
        cursor += len(c.token_ids)
        if c.finished:
            return tokens, c


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_local_continuation_equals_the_uninterrupted_request(model, cut):
    expected = LLM(model, **ENGINE).generate([PROMPT], GREEDY)[0].token_ids
    w = build_decode_worker(model, ENGINE, transport=None)
    try:
        w.generate_local(RequestSpec("r#1", PROMPT, GREEDY), tuple(expected[:cut]))
        tokens, last = _drain(w, "r#1", cut)  # readers start past the emitted tokens
        assert tokens == expected[cut:] and last.finish_reason == "length"  # max_tokens counts the emitted ones
        assert w.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    finally:
        w.shutdown()


def test_seeded_sampling_and_logprobs_continue_across_the_cut(model):
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=1234, ignore_eos=True, logprobs=2)
    full = LLM(model, **ENGINE).generate([PROMPT], params)[0]
    w = build_decode_worker(model, ENGINE, transport=None)
    try:
        w.generate_local(RequestSpec("s", PROMPT, params), tuple(full.token_ids[:4]))
        c = w.read("s", 4, timeout=10)
        tokens, logprobs = list(c.token_ids), list(c.logprobs)
        while not c.finished:
            c = w.read("s", 4 + len(tokens), timeout=10)
            tokens += c.token_ids
            logprobs += c.logprobs
    finally:
        w.shutdown()
    # the sampler seeds each draw with (seed, token index): the continuation draws the same
    assert tokens == full.token_ids[4:]
    assert [lp.token_id for lp in logprobs] == tokens  # aligned with the tokens read, no placeholder


def test_stop_string_spanning_the_cut_still_stops(model):
    from engine.tokenizer import load_tokenizer

    base = LLM(model, **ENGINE).generate([PROMPT], GREEDY)[0].token_ids
    tok = load_tokenizer(model, False)
    if tok is None:
        pytest.fail("the tiny checkpoint ships a tokenizer")
    # a stop string made of the text of tokens 3..5: with the cut at 4 it spans the cut
    text = tok.decode(base[:6])
    prev = tok.decode(base[:3])
    stop = text[len(prev) :]
    assert stop.strip(), f"tokens 3..5 decode to whitespace only: {stop!r}"
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))
    uninterrupted = LLM(model, **ENGINE).generate([PROMPT], params)[0]
    w = build_decode_worker(model, ENGINE, transport=None)
    try:
        w.generate_local(RequestSpec("t", PROMPT, params), tuple(base[:4]))
        tokens, last = _drain(w, "t", 4)
    finally:
        w.shutdown()
    assert uninterrupted.finish_reason == "stop"
    assert base[:4] + tokens == uninterrupted.token_ids and last.finish_reason == "stop"


def test_transferred_continuation_equals_the_uninterrupted_request(model):
    expected = LLM(model, **ENGINE).generate([PROMPT], GREEDY)[0].token_ids
    emitted = tuple(expected[:5])
    d = build_decode_worker(model, ENGINE, transport="loopback")
    p = build_prefill_worker(model, ENGINE, transport="loopback")
    try:
        spec = RequestSpec("x#1", PROMPT, GREEDY)
        d.start_transfer(spec, emitted)
        first = p.prefill(spec, d.kv_address(), 30, emitted)
        assert first.token_ids == [expected[5]] and not first.finished  # the next token alone
        d.set_first_token("x#1", FirstToken(first.token_ids[0], None, first.num_cached_tokens))
        tokens, last = _drain(d, "x#1", len(emitted) + 1)
        assert [*emitted, *first.token_ids, *tokens] == expected and last.finish_reason == "length"
        assert d.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
    finally:
        p.shutdown()
        d.shutdown()


def test_the_workers_refuse_past_their_bound(model):
    d = build_decode_worker(model, ENGINE, transport="loopback", max_pending=2)
    p = build_prefill_worker(model, ENGINE, transport="loopback", max_pending=1)
    try:
        d.start_transfer(RequestSpec("a", PROMPT, GREEDY))
        d.start_transfer(RequestSpec("b", PROMPT, GREEDY))
        with pytest.raises(queue.Full, match="holds 2 requests, its bound"):
            d.generate_local(RequestSpec("c", PROMPT, GREEDY))
        d.abort("a")  # room again

        def accept_c_and_count() -> int:  # one loop call (what generate_local runs), no step between
            d._generate_local(RequestSpec("c", PROMPT, GREEDY), ())
            return d._compute_stats().pending_requests

        assert d.loop.run(accept_c_and_count) == 2  # b waiting for its KV, c accepted

        def two_at_once():  # on the loop thread: nothing is prefilled between the two
            p._add(RequestSpec("p1", PROMPT, GREEDY), d.kv_address(), ())
            p._add(RequestSpec("p2", PROMPT, GREEDY), d.kv_address(), ())

        with pytest.raises(queue.Full, match="prefilling 1 requests, its bound"):
            p.loop.run(two_at_once)
    finally:
        p.shutdown()
        d.shutdown()


def test_emitted_tokens_that_already_end_the_request_end_it_at_once(model):
    """The end was generated but never delivered (the placement failed in between): the
    continuation finishes at once with the same reason, computing nothing."""
    expected = LLM(model, **ENGINE).generate([PROMPT], GREEDY)[0].token_ids
    eos = LLM(model, **ENGINE).engine.config.model.eos_token_ids[0]
    d = build_decode_worker(model, ENGINE, transport="loopback")
    p = build_prefill_worker(model, ENGINE, transport="loopback")
    try:
        d.generate_local(RequestSpec("full", PROMPT, GREEDY), tuple(expected))  # all max_tokens of them
        tokens, last = _drain(d, "full", len(expected))
        assert tokens == [] and last.finish_reason == "length"
        stop = SamplingParams(max_tokens=12, temperature=0.0)  # EOS counts (no ignore_eos)
        first = p.prefill(RequestSpec("eos", PROMPT, stop), d.kv_address(), 30, (expected[0], eos))
        assert first.token_ids == [] and first.finished and first.finish_reason == "stop"
        assert d.stats().engine.free_kv_blocks == p.stats().engine.free_kv_blocks == ENGINE["num_blocks"]
        assert d.stats().pending_requests == 0 and p.stats().pending_requests == 0
    finally:
        p.shutdown()
        d.shutdown()
