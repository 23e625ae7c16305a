"""The real model (SmolLM2-135M-Instruct: 3 KV heads) with attention offloaded to 2 attention
shards (per-request partitioning), rotation of 2 micro-batches: greedy decoding is
argmax-consistent with transformers' full forward at every generated token
(tests/correctness/full_forward.py), equal to engine.LLM on the fraction reported, and the
shards' sub-pools at the engine are free again afterwards."""

from __future__ import annotations

import pytest

from attention_offload.build import build_loopback
from engine import LLM, SamplingParams
from engine.llm import build_engine_config
from engine.request import Request
from tests.correctness.full_forward import check_argmax_consistent
from tests.real_model import PROMPTS

MAX_NEW_TOKENS = 32
BLOCKS = 128

pytestmark = pytest.mark.slow


def test_offloaded_greedy_is_argmax_consistent_with_transformers(smollm2_dir, hf_model, chat_prompts) -> None:
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    cfg = build_engine_config(smollm2_dir, enable_prefix_caching=False, num_blocks=BLOCKS)
    assert cfg.model.num_kv_heads == 3  # 2 shards could not split the heads evenly: requests are split
    engine = build_loopback(cfg, [BLOCKS // 2] * 2, rotation=2)
    reqs = [Request(f"r{i}", list(p), params) for i, p in enumerate(chat_prompts)]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    assert {engine.shard_of(r.request_id) for r in reqs} == {0, 1}
    while engine.has_work():
        engine.step()
    outs = [r.output_token_ids for r in reqs]
    assert all(len(o) == MAX_NEW_TOKENS for o in outs)
    agreement = check_argmax_consistent(hf_model, chat_prompts, outs, PROMPTS)
    assert agreement.total == len(PROMPTS) * MAX_NEW_TOKENS
    ref = LLM(smollm2_dir, enable_prefix_caching=False, num_blocks=BLOCKS).generate(chat_prompts, params)
    same = sum(a == b for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r.token_ids, strict=True))
    print(
        f"offloaded SmolLM2: {agreement.exact} exact + {agreement.ties} ties of {agreement.total}; "
        f"equal to engine.LLM on {same}/{agreement.total}"
    )
    assert same / agreement.total >= 0.99
    for s in range(2):
        st = engine.transport.stats(s)
        assert (st.total_blocks, st.live_contexts) == (BLOCKS // 2, 0) and st.batches > 0
    assert engine.used_blocks() == [0, 0] and engine.core.pool.num_free == BLOCKS
    engine.transport.close()
