"""The real model served disaggregated (LocalCluster: prefill worker -> KV transfer -> decode
worker) over every transport: greedy output argmax-consistent with transformers' full forward
at every generated token, and its agreement with the colocated engine.LLM reported.

The decode worker batches the requests differently from a colocated engine (other matmul
shapes), so equality with engine.LLM is measured, not assumed; the reference we did not write
(transformers' full no-cache forward) is what every token must agree with.
"""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from tests.correctness.full_forward import check_argmax_consistent
from tests.real_model import PROMPTS

pytestmark = pytest.mark.slow

ENGINE = {"num_blocks": 64, "max_num_batched_tokens": 256}  # 16-token blocks: 1024 tokens per worker
MAX_NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
N_PROMPTS = 4


@pytest.fixture(scope="module")
def colocated(smollm2_dir: str, chat_prompts) -> list[list[int]]:
    llm = LLM(smollm2_dir, **ENGINE)
    return [o.token_ids for o in llm.generate(chat_prompts[:N_PROMPTS], GREEDY)]


@pytest.mark.parametrize("kind", ["loopback", "shm", "grpc", "torch"])
def test_disaggregated_greedy_is_argmax_consistent(
    smollm2_dir, chat_prompts, hf_model, colocated, kind, record_property
):
    prompts = chat_prompts[:N_PROMPTS]
    cfg = ServeConfig(
        model=smollm2_dir,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=1),  # every prompt crosses the transport
        transfer=TransferConfig(kind=kind),
    )

    async def run() -> tuple[list[list[int]], list[int]]:
        cluster = await LocalCluster(cfg).start()
        try:

            async def one(i: int, prompt: list[int]) -> list[int]:
                tokens: list[int] = []
                async for chunk in cluster.router.generate(RequestSpec(f"{kind}-{i}", prompt, GREEDY)):
                    assert chunk.error is None, chunk.error
                    tokens += chunk.token_ids
                return tokens

            outputs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            # prompts queued for prefill on each worker: all on prefill-0, none on decode-0
            queued = [cluster.workers[w].stats().queue_seconds.count for w in ("prefill-0", "decode-0")]
            return outputs, queued
        finally:
            cluster.shutdown()

    outputs, queued = asyncio.run(run())
    assert queued == [N_PROMPTS, 0], "a prompt was not prefilled by the prefill worker: it did not cross the transport"
    assert all(len(o) == MAX_NEW_TOKENS for o in outputs)
    agreement = check_argmax_consistent(hf_model, prompts, outputs, [f"{kind}: {p!r}" for p in PROMPTS[:N_PROMPTS]])
    equal = sum(a == b for out, ref in zip(outputs, colocated) for a, b in zip(out, ref))
    record_property("exact", agreement.exact)
    record_property("ties", agreement.ties)
    record_property("equal_to_llm", equal)
    print(
        f"{kind}: {agreement.exact} exact + {agreement.ties} ties; {equal}/{N_PROMPTS * MAX_NEW_TOKENS} equal to engine.LLM"
    )
    assert agreement.total == N_PROMPTS * MAX_NEW_TOKENS
