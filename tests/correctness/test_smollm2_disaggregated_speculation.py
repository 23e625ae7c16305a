"""The real model served disaggregated with a speculating decode worker (n-gram proposer,
SmartSpec): greedy output argmax-consistent with transformers' full forward at every token,
and its agreement with engine.LLM without speculation reported (verifying k+1 rows changes
matmul shapes, so equality is measured, not assumed)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from tests.correctness.full_forward import check_argmax_consistent

pytestmark = pytest.mark.slow

ENGINE = {"num_blocks": 64, "max_num_batched_tokens": 256}
NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
# quote-the-input requests: n-gram lookup finds the continuation in the prompt
QUOTES = (
    "Repeat this sentence exactly, twice: The quick brown fox jumps over the lazy dog near the river bank.",
    "Copy the list: apples, pears, plums, cherries, apples, pears, plums, cherries, apples, pears.",
)


def test_ngram_speculation_on_the_decode_worker_is_argmax_consistent(smollm2_dir, hf_tokenizer, hf_model):
    prompts = []
    for text in QUOTES:
        rendered = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(hf_tokenizer(rendered, add_special_tokens=False).input_ids)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "policy": "smartspec"}
    cfg = ServeConfig(
        model=smollm2_dir,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=ENGINE),
            PoolConfig("decode", "decode", 1, engine={**ENGINE, "speculative_config": spec}),
        ),
        router=RouterConfig(short_prompt_threshold=1),
        transfer=TransferConfig(kind="shm"),
    )

    async def run():
        cluster = await LocalCluster(cfg).start()
        try:

            async def one(i: int, prompt: list[int]) -> list[int]:
                tokens: list[int] = []
                async for chunk in cluster.router.generate(RequestSpec(f"q{i}", prompt, GREEDY)):
                    assert chunk.error is None, chunk.error
                    tokens += chunk.token_ids
                return tokens

            outputs = [await one(i, p) for i, p in enumerate(prompts)]  # one at a time: low load, k > 0
            return outputs, cluster.workers["decode-0"].engine.spec_stats()
        finally:
            await cluster.stop()

    outputs, stats = asyncio.run(run())
    plain = [o.token_ids for o in LLM(smollm2_dir, **ENGINE).generate(prompts, GREEDY)]
    agreement = check_argmax_consistent(hf_model, prompts, outputs, list(QUOTES))
    equal = sum(a == b for out, ref in zip(outputs, plain) for a, b in zip(out, ref))
    print(
        f"n-gram disaggregated: {agreement.exact} exact + {agreement.ties} ties of {len(prompts) * NEW_TOKENS}; "
        f"{equal} equal to engine.LLM without speculation; proposed {stats.proposed_tokens}, "
        f"accepted {stats.accepted_tokens}"
    )
    assert agreement.total == len(prompts) * NEW_TOKENS
    assert equal >= 0.99 * len(prompts) * NEW_TOKENS
    assert stats.proposed_tokens > 0 and stats.accepted_tokens > 0
