"""Disaggregated serving with mixed TP degrees on the real SmolLM2-135M (9 query / 3 KV heads:
TP=3 holds one KV head per rank), in process (LocalCluster): prefill TP=1 -> decode TP=3 and
prefill TP=3 -> decode TP=1, every chat prompt through the prefill worker's KV transfer.
Greedy tokens must agree with engine.LLM (TP=1, one process) on >= 99% of tokens (TP changes
the float reduction order, so argmax agreement, not bit equality), and every pool is back to
full afterwards."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from tests.router_streams import collect_ok

ENGINE = {"num_blocks": 64, "block_size": 16, "max_num_batched_tokens": 64, "skip_tokenizer_init": True}
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize(("prefill_tp", "decode_tp", "layerwise"), [(1, 3, True), (3, 1, False)])
def test_mixed_tp_disaggregation_on_smollm2_agrees_with_llm(
    smollm2_dir, chat_prompts, prefill_tp, decode_tp, layerwise
):
    cfg = ServeConfig(
        model=smollm2_dir,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=ENGINE, tensor_parallel=prefill_tp),
            PoolConfig("decode", "decode", 1, engine=ENGINE, tensor_parallel=decode_tp),
        ),
        router=RouterConfig(short_prompt_threshold=0, fallback_local_prefill=False, max_mixed_workers=0),
        transfer=TransferConfig(kind="loopback", layerwise=layerwise),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=60.0).start()
        try:
            got = await asyncio.gather(
                *(collect_ok(cluster.router, f"r{i}", p, GREEDY) for i, p in enumerate(chat_prompts))
            )
            pools = []
            for wid in ("prefill-0", "decode-0"):
                tw = cluster.tp_workers.get(wid)
                engine = cluster.workers[wid].engine
                pools += [engine.pool] if tw is None else [engine.core.pool, *(f.engine.pool for f in tw.followers)]
            deadline = asyncio.get_running_loop().time() + 60.0
            while not all(p.num_free == p.num_blocks for p in pools) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)  # poll interval: releases travel through the loops and follower queues
            stats = cluster.workers["prefill-0"].stats()
            return got, [(p.num_free, p.num_blocks) for p in pools], stats
        finally:
            await cluster.stop()

    got, pools, prefill = asyncio.run(run())
    want = [o.token_ids for o in LLM(smollm2_dir, **ENGINE).generate(list(chat_prompts), GREEDY)]
    total = sum(len(w) for w in want)
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    print(f"SmolLM2 P TP={prefill_tp} -> D TP={decode_tp} layerwise={layerwise}: {same}/{total} tokens agree with LLM")
    assert [len(g) for g in got] == [len(w) for w in want]
    assert same / total >= 0.99, (got, want)
    assert all(free == n > 0 for free, n in pools), pools
    assert prefill.transfer_failures == 0 and prefill.transfer_bytes > 0
