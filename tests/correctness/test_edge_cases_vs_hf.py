"""Scheduling and paging corner cases against transformers, plus the prefill -> decode hand-off.

Odd page sizes (1, 3, pages longer than most prompts), one-token prompts, identical prompts
in one batch, one request at a time (later prompts hit earlier ones' pages within a call),
a one-token step budget, and a prompt prefilled by a PREFILL_ONLY engine whose pages are
copied into a DECODE_ONLY engine that finishes the generation.
"""

from __future__ import annotations

import pytest

from engine import LLM
from engine.request import RequestStatus
from tests.correctness.hf_ref import (
    StepLog,
    assert_matches_hf,
    assert_pool_full,
    greedy_params,
    hf_greedy,
    random_prompts,
)

MAX_NEW = 32


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama", num_key_value_heads=1)


@pytest.mark.parametrize("block_size", [1, 3, 32])
def test_odd_block_sizes(ckpt, block_size):
    llm = LLM(model=ckpt, block_size=block_size, num_blocks=1024 // block_size, attention_backend="sdpa")
    prompts = random_prompts(seed=31, lengths=(1, 2, 3, 31, 32, 33, 64))
    assert_matches_hf(ckpt, llm, prompts, MAX_NEW)
    assert_matches_hf(ckpt, llm, prompts[3:], MAX_NEW)  # second call from the cache
    assert llm.engine.pool.prefix_hits > 0


def test_identical_prompts_in_one_batch(ckpt):
    llm = LLM(model=ckpt, block_size=4, num_blocks=256, attention_backend="sdpa")
    (p,) = random_prompts(seed=32, lengths=(21,))
    outs = assert_matches_hf(ckpt, llm, [p, p, p, p[:-1], p + [7]], MAX_NEW)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids


def test_serial_requests_reuse_each_others_pages(ckpt):
    llm = LLM(model=ckpt, block_size=4, num_blocks=256, max_num_seqs=1, attention_backend="sdpa")
    shared = random_prompts(seed=33, lengths=(16,))[0]
    prompts = random_prompts(seed=34, lengths=(5, 9, 2), prefix=shared)
    log = StepLog(llm)
    outs = assert_matches_hf(ckpt, llm, prompts, MAX_NEW)
    assert log.max_seqs_per_step == 1
    assert outs[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in outs[1:]] == [16, 16]


def test_one_token_budget(ckpt):
    llm = LLM(model=ckpt, block_size=4, num_blocks=64, max_num_batched_tokens=1, attention_backend="sdpa")
    log = StepLog(llm)
    assert_matches_hf(ckpt, llm, random_prompts(seed=35, lengths=(1, 9)), 8)
    assert log.max_tokens_per_step == 1


def test_preemption_when_both_requests_outgrow_the_pool(ckpt):
    """Both prompts fit, both generations do not: the newer one is recomputed later."""
    llm = LLM(model=ckpt, block_size=4, num_blocks=26, enable_prefix_caching=False, attention_backend="sdpa")
    log = StepLog(llm)
    assert_matches_hf(ckpt, llm, random_prompts(seed=36, lengths=(20, 22)), 40)  # 15 + 16 blocks > 26
    assert llm.engine.scheduler.num_preemptions >= 1
    assert log.max_seqs_per_step == 2


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_prefill_engine_hands_pages_to_decode_engine(tiny_checkpoint, family):
    ckpt = tiny_checkpoint(family)
    opts = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa", "max_num_batched_tokens": 24}
    prefill = LLM(model=ckpt, mode="prefill_only", **opts)
    decode = LLM(model=ckpt, mode="decode_only", **opts)
    prompts = random_prompts(seed=37, lengths=(3, 17, 40))
    params = greedy_params(MAX_NEW)
    reqs = [prefill.make_request(p, params) for p in prompts]
    for r in reqs:
        prefill.engine.add_request(r)
    while prefill.engine.has_work():
        prefill.engine.step()
    handed = []
    for r in reversed(reqs):  # reversed: the decode engine hands out different page ids
        assert r.status == RequestStatus.PREFILLED and len(r.output_token_ids) == 1
        src = prefill.engine.kv.block_ids(r.request_id)
        d = decode.engine.prepare(decode.make_request(r.prompt_token_ids, params, request_id=r.request_id))
        dst = decode.engine.scheduler.reserve(d)
        assert dst is not None and len(dst) == len(src)
        assert dst != src  # the copy below, not a coincidence of ids, carries the KV
        for layer in range(decode.engine.layout.num_layers):
            decode.engine.cache.write_pages(layer, dst, prefill.engine.cache.read_pages(layer, src))
        decode.engine.scheduler.admit(r.request_id, r.output_token_ids[0])
        prefill.engine.scheduler.release(r.request_id)
        handed.append(d)
    assert_pool_full(prefill)
    while decode.engine.has_work():
        decode.engine.step()
    for p, d in zip(prompts, reversed(handed), strict=True):
        assert d.output_token_ids == hf_greedy(ckpt, p, MAX_NEW)
        assert d.finish_reason.value == "length"
    assert_pool_full(decode)
