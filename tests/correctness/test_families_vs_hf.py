"""Greedy generation of every supported family is token-identical to transformers.

Each family runs a batch of random-id prompts of mixed lengths (3..70 tokens, 32 new tokens)
through the engine under one scheduling regime per test: plain continuous batching,
prefix caching (with a second call that must hit the cache), chunked prefill with a
16-token budget, forced preemption, and all of those at once. After every run the KV pool
must be entirely free again.
"""

from __future__ import annotations

import pytest

from engine import LLM
from engine.models.tiny import TINY_FAMILIES
from tests.correctness.hf_ref import StepLog, assert_matches_hf, random_prompts

MAX_NEW = 32


@pytest.fixture(params=TINY_FAMILIES)
def ckpt(request, tiny_checkpoint) -> str:
    return tiny_checkpoint(request.param)


def test_batched_no_prefix_cache(ckpt):
    llm = LLM(model=ckpt, block_size=16, num_blocks=64, enable_prefix_caching=False, attention_backend="sdpa")
    log = StepLog(llm)
    prompts = random_prompts(seed=1)
    outs = assert_matches_hf(ckpt, llm, prompts, MAX_NEW)
    assert all(o.num_cached_tokens == 0 for o in outs)
    assert llm.engine.scheduler.num_preemptions == 0
    assert log.max_seqs_per_step == len(prompts)  # the prompts really ran as one batch


def test_prefix_cache_shared_prefix_and_second_call(ckpt):
    bs = 8
    llm = LLM(model=ckpt, block_size=bs, num_blocks=160, enable_prefix_caching=True, attention_backend="sdpa")
    log = StepLog(llm)
    shared = random_prompts(seed=100, lengths=(40,))[0]  # 5 full blocks
    first = random_prompts(seed=2, lengths=(3, 12, 25), prefix=shared) + random_prompts(seed=3, lengths=(5, 48))
    outs1 = assert_matches_hf(ckpt, llm, first, MAX_NEW)
    # Second call: the same prompts again plus new ones behind the same 40-token prefix.
    second = first + random_prompts(seed=4, lengths=(1, 30), prefix=shared)
    outs2 = assert_matches_hf(ckpt, llm, second, MAX_NEW)

    for p, o1, o2 in zip(first, outs1, outs2, strict=False):
        assert o2.token_ids == o1.token_ids
        # every full block but the one holding the last prompt token comes from the cache
        assert o2.num_cached_tokens == (len(p) - 1) // bs * bs
    for o in outs2[len(first) :]:
        assert o.num_cached_tokens == len(shared)  # the tails are new content
    assert sum(o.num_cached_tokens for o in outs2) > 0
    assert log.max_ref_count >= 2  # cached blocks were shared by concurrent requests
    assert llm.engine.pool.prefix_hits > 0


def test_chunked_prefill_small_budget(ckpt):
    llm = LLM(
        model=ckpt,
        block_size=4,
        num_blocks=256,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        attention_backend="sdpa",
    )
    log = StepLog(llm)
    assert_matches_hf(ckpt, llm, random_prompts(seed=5), MAX_NEW)
    assert log.max_tokens_per_step <= 16
    assert log.num_partial_prefills > 0  # long prompts really were split
    assert log.num_mixed_steps > 0  # decodes ran next to prompt chunks


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no_cache", "cache"])
def test_forced_preemption(ckpt, prefix_caching):
    # 16 blocks of 8 tokens = 128 slots for 7 requests needing up to 102 tokens each.
    llm = LLM(
        model=ckpt,
        block_size=8,
        num_blocks=16,
        enable_prefix_caching=prefix_caching,
        attention_backend="sdpa",
    )
    assert_matches_hf(ckpt, llm, random_prompts(seed=6), MAX_NEW)
    assert llm.engine.scheduler.num_preemptions > 0


def test_everything_at_once(ckpt):
    """Chunked prefill + prefix caching + preemption + a shared prefix in one run."""
    shared = random_prompts(seed=101, lengths=(20,))[0]
    prompts = random_prompts(seed=7, lengths=(3, 40, 11), prefix=shared) + random_prompts(seed=8, lengths=(6, 70))
    llm = LLM(
        model=ckpt,
        block_size=4,
        num_blocks=40,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        enable_prefix_caching=True,
        attention_backend="sdpa",
    )
    log = StepLog(llm)
    assert_matches_hf(ckpt, llm, prompts, MAX_NEW)
    assert_matches_hf(ckpt, llm, prompts[:3], MAX_NEW)  # again, now largely from the cache
    assert llm.engine.scheduler.num_preemptions > 0
    assert log.num_partial_prefills > 0
    assert log.max_tokens_per_step <= 16
    assert log.max_seqs_per_step <= 4
