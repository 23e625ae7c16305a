"""A tensor-parallel mixed pool in the in-process LocalCluster: each worker is 2 EngineCore
shards over the gloo group ``tp/<worker>`` (decode_worker/tensor_parallel.py), rank 0 routed,
rank 1 replaying its engine calls. Concurrent requests (and one cancelled mid-stream) give
engine.LLM's greedy tokens; every rank's KV pool is back to full and in the same state (SPMD);
a killed worker is replaced as a whole (every rank, a new group) and serves again. A rank that
dies mid-stream fails rank 0's next collective within the group timeout (never a hang); the
request fails over and continues on the replacement with LLM's tokens."""

from __future__ import annotations

import asyncio

from cluster.config import PoolConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from tests.router_streams import CancelledMidway, collect_ok

# 16 query / 8 KV heads: TP=2 divides (tests/correctness/test_tp_engine.py's model); odd vocab: uneven split
WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
ENGINE = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa", "skip_tokenizer_init": True}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 59)), [5, 9, 2, 7], list(range(60, 90))]


def test_tp_pool_in_process_serves_as_llm_and_is_replaced_whole(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    cfg = ServeConfig(
        model=ckpt,
        pools=(PoolConfig("mixed", "mixed", 1, engine=ENGINE, tensor_parallel=2),),
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            gone = CancelledMidway(cluster.router, "gone", PROMPTS[0]).start()  # a client that goes away mid-stream
            got = await asyncio.gather(*(collect_ok(cluster.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            await gone.cancel()
            tw = cluster.tp_workers["mixed-0"]
            (follower,) = tw.followers
            leader_pool, follower_pool = tw.worker.engine.core.pool, follower.engine.pool
            deadline = asyncio.get_running_loop().time() + 30.0
            while True:  # the abort reaches rank 0's loop, then rank 1's queue
                full = (leader_pool.num_free, follower_pool.num_free) == (leader_pool.num_blocks,) * 2
                if full or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)  # poll interval
            assert full, (leader_pool.num_free, follower_pool.num_free, leader_pool.num_blocks)
            assert follower.error is None
            assert len(cluster.router.requests) == 0
            # the paged cache holds each rank's 4 of the 8 KV heads
            assert tw.worker.engine.layout.num_kv_heads == follower.engine.layout.num_kv_heads == 4

            await cluster.kill_worker("mixed-0")
            cluster.replace_worker("mixed-0")  # the whole group: both ranks, a new tp/mixed-0
            assert cluster.tp_workers["mixed-0"] is not tw  # every rank rebuilt
            again = await collect_ok(cluster.router, "after", PROMPTS[2], GREEDY)
            return got, again
        finally:
            await cluster.stop()

    got, again = asyncio.run(run())
    want = [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, GREEDY)]
    assert got == want
    assert again == want[2]


def test_a_dead_rank_fails_the_tp_worker_within_the_timeout_and_its_request_continues_on_the_replacement(
    tiny_checkpoint,
) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    cfg = ServeConfig(
        model=ckpt,
        pools=(PoolConfig("mixed", "mixed", 1, engine=ENGINE, tensor_parallel=2),),
        transfer=TransferConfig(kind="loopback"),
    )
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def run():
        # a 2 s group timeout: rank 0's next all-reduce without rank 1 fails within it (never hangs)
        cluster = await LocalCluster(cfg, ep_group_timeout_s=2.0).start()
        try:
            tokens: list[int] = []
            killed_at = 0
            async for chunk in cluster.router.generate(RequestSpec("r", PROMPTS[0], params)):
                assert chunk.error is None, chunk.error
                tokens += chunk.token_ids
                if not killed_at and len(tokens) >= 3:
                    killed_at = len(tokens)
                    cluster.tp_workers["mixed-0"].followers[0].stop(10.0)  # rank 1 is gone mid-stream
                    asyncio.get_running_loop().create_task(replace_when_lost(cluster))
            return tokens, killed_at, cluster.router.stats
        finally:
            await cluster.stop()

    async def replace_when_lost(cluster: LocalCluster) -> None:
        while cluster.router.stats.waiting < 1:  # rank 0's step failed: the request waits for a worker
            await asyncio.sleep(0.02)  # poll interval
        cluster.replace_worker("mixed-0")  # every rank rebuilt, a new group

    tokens, killed_at, stats = asyncio.run(run())
    assert 3 <= killed_at < params.max_tokens
    (want,) = LLM(ckpt, **ENGINE).generate([PROMPTS[0]], params)
    assert tokens == want.token_ids  # recomputed from the emitted tokens on the replacement
    assert stats.failovers["worker_lost"] == 1
