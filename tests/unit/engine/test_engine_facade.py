"""EngineCore as the facade workers drive: step results, reserve/admit/release, pins, stats."""

from __future__ import annotations

import pytest

from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.request import Request, RequestStatus, SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def core(model: str, mode: str = "mixed", **opts) -> EngineCore:
    return EngineCore(build_engine_config(model, mode=mode, **{"block_size": 4, **opts}))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama")


def test_step_result_names_the_preempted_requests(model):
    e = core(model, num_blocks=12, max_num_batched_tokens=64)  # 48 token slots: two requests outgrow it
    e.add_request(Request("a", list(range(3, 15)), GREEDY))
    e.add_request(Request("b", list(range(20, 32)), GREEDY))
    preempted: list[str] = []
    while e.has_work() and not preempted:
        preempted = e.step().preempted
    assert preempted == ["b"]  # the newest running request goes back for recompute
    assert e.stats().preemptions == 1
    while e.has_work():
        e.step()
    assert e.stats().free_kv_blocks == 12


def test_stats_count_only_prompt_work_as_pending(model):
    e = core(model, num_blocks=64, max_num_batched_tokens=8)
    e.add_request(Request("a", list(range(3, 23)), GREEDY))  # 20 prompt tokens, chunks of 8
    assert e.stats().pending_prompt_tokens == 20 and e.stats().waiting_requests == 1
    e.step()
    s = e.stats()
    assert (s.running_requests, s.waiting_requests, s.pending_prompt_tokens) == (1, 0, 12)
    e.step()
    e.step()  # the prompt is done and a token sampled: decoding holds no prompt work
    assert e.stats().pending_prompt_tokens == 0


def test_reserve_admit_and_release_through_the_facade(model):
    d = core(model, mode="decode_only", num_blocks=16)
    req = Request("r", list(range(3, 13)), GREEDY)
    blocks = d.reserve(req)
    assert blocks is not None and len(blocks) == 3 and d.block_ids("r") == blocks
    assert d.stats().free_kv_blocks == 13
    admitted = d.admit("r", 7)
    assert admitted.status == RequestStatus.RUNNING and admitted.output_token_ids == [7]
    d.abort("r")
    assert d.stats().free_kv_blocks == 16

    p = core(model, mode="prefill_only", num_blocks=16)
    p.add_request(Request("q", list(range(3, 13)), GREEDY))
    out = []
    while not out:
        out = p.step().outputs
    assert out[0].status == RequestStatus.PREFILLED and p.stats().free_kv_blocks == 13  # held for the transfer
    held = p.block_ids("q")
    p.pin(held)  # a transport still reads them
    p.release("q")
    assert p.stats().free_kv_blocks == 13  # pinned blocks are not reusable yet
    p.unpin(held)
    assert p.stats().free_kv_blocks == 16


def test_limits_and_cached_hashes(model):
    e = core(model, num_blocks=32, max_num_batched_tokens=64, max_model_len=200)
    lim = e.limits()
    assert (lim.max_model_len, lim.block_size, lim.num_kv_blocks, lim.max_num_batched_tokens) == (200, 4, 32, 64)
    assert lim.max_context_tokens == 128 and lim.chunked_prefill
    e.add_request(Request("a", list(range(3, 16)), SamplingParams(max_tokens=1, temperature=0.0)))
    while e.has_work():
        e.step()
    from engine.kv_cache.manager import hash_block

    # the 3 full blocks of the 13-token prompt (the 14th token fills no 4th block), chained
    h0 = hash_block(None, (3, 4, 5, 6))
    h1 = hash_block(h0, (7, 8, 9, 10))
    assert e.cached_block_hashes() == {h0, h1, hash_block(h1, (11, 12, 13, 14))}
