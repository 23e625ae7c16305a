"""Attention offload served by Ray actors: a mixed pool of one DecodeActor (the model worker,
an OffloadedEngine) and an attention pool of two AttentionActors holding its KV, the group
formed by the controller, on the tiny Llama. Concurrent greedy requests equal engine.LLM's
tokens; GetServerInfo shows the attention workers and their KV blocks; an attention worker
killed mid-stream takes its group down (the model worker's next step fails within the group's
timeout: no wrong token, no hang), the controller replaces the group as one, and the request
that was streaming fails over and finishes with LLM's tokens."""

from __future__ import annotations

import asyncio
import random

import pytest
import ray

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.controller import Controller
from cluster.frontends.grpc_server import server_info_message
from cluster.frontends.service import ServerInfo
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from tests.integration.fast_options import FAST_GROUPS
from tests.router_streams import collect

pytestmark = pytest.mark.integration

MODEL_ENGINE = {"block_size": 8, "attention_backend": "sdpa", "enable_prefix_caching": False}
ATTN_BLOCKS = 48  # per attention worker
ATTN_ENGINE = {"block_size": 8, "num_blocks": ATTN_BLOCKS, "attention_backend": "sdpa"}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


async def _collect(c: Controller, rid: str, prompt: list[int], params: SamplingParams):
    return await collect(c.router, rid, prompt, params)


def test_an_attention_pool_serves_as_llm_and_its_group_comes_back_after_a_member_dies(
    ray_local, tiny_checkpoint
) -> None:
    ckpt = tiny_checkpoint("llama")
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 9, 30, 12, 3)]
    long_prompt = [rng.randrange(3, 500) for _ in range(10)]
    long_params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    llm = LLM(ckpt, **MODEL_ENGINE, num_blocks=2 * ATTN_BLOCKS)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    long_expected = llm.generate([long_prompt], long_params)[0].token_ids
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("mixed", "mixed", 1, num_cpus=0.5, engine=MODEL_ENGINE),
            # the one-node shared-memory group (engine/runtime/shm_group.py) between real processes;
            # tests/integration/test_ep_ray.py covers gloo groups on Ray
            PoolConfig("attention", "attention", 2, num_cpus=0.5, engine=ATTN_ENGINE, group_transport="shm"),
        ),
        transfer=TransferConfig(kind="shm"),
    )

    async def run():
        c = await Controller(cfg, FAST_GROUPS).start()
        try:
            results = await asyncio.gather(*(_collect(c, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.check_health()  # one round: the attention workers' stats are polled
            info = c.info()

            # an attention worker dies mid-stream: the group is replaced as one, the request fails over
            stream = c.router.generate(RequestSpec("long", long_prompt, long_params))
            first = await anext(stream)
            assert first.token_ids and not first.finished
            ray.kill(c.workers["attention-1"].actor, no_restart=True)
            rest = [chunk async for chunk in stream]
            for wid in ("mixed-0", "attention-0", "attention-1"):
                await c.wait_replaced(wid, timeout=180)
            after = await asyncio.gather(*(_collect(c, f"a{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.check_health()
            return results, info, first, rest, after, c.info(), dict(c.router.stats.failovers)
        finally:
            await c.shutdown()

    results, info, first, rest, after, info_after, failovers = asyncio.run(run())
    assert [last.finish_reason for _, last in results] == ["length"] * len(prompts)
    assert [tokens for tokens, _ in results] == expected
    # GetServerInfo: the model worker's pool is the attention workers' total; each attention worker's blocks
    msg = server_info_message(ServerInfo(cluster=info, inflight=0, max_queue=8))
    blocks = {w.worker_id: (w.role, w.healthy, w.total_kv_blocks) for w in msg.workers}
    assert blocks == {
        "mixed-0": ("mixed", True, 2 * ATTN_BLOCKS),
        "attention-0": ("attention", True, ATTN_BLOCKS),
        "attention-1": ("attention", True, ATTN_BLOCKS),
    }
    assert {p.role: (p.num_workers, p.num_healthy) for p in msg.pools}["attention"] == (2, 2)

    assert rest[-1].finish_reason == "length" and rest[-1].error is None, rest[-1]
    assert first.token_ids + [t for ch in rest for t in ch.token_ids] == long_expected
    assert failovers["worker_lost"] >= 1, failovers
    assert {w.worker_id: (w.healthy, w.restarts) for w in info_after.workers} == {"mixed-0": (True, 1)}
    assert {a.worker_id: a.state for a in info_after.attention_workers} == {
        "attention-0": "serving",
        "attention-1": "serving",
    }
    assert [tokens for tokens, _ in after] == expected  # the re-formed group serves as before


def test_a_prefill_pool_pushes_kv_straight_to_the_attention_actors(ray_local, tiny_checkpoint) -> None:
    """A prefill actor, the model worker (a decode actor) and two attention actors, over shm:
    every prompt is transferred (short_prompt_threshold 0), its KV going from the prefill actor
    straight to the attention actor the model worker placed it on; streams equal engine.LLM,
    both attention actors' receivers took pages and every byte sent landed on one of them; after
    an attention actor dies and the group is replaced, the same prompts still equal LLM."""
    ckpt = tiny_checkpoint("llama")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 9, 30, 12, 3)]
    expected = [o.token_ids for o in LLM(ckpt, **MODEL_ENGINE, num_blocks=2 * ATTN_BLOCKS).generate(prompts, GREEDY)]
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 1, num_cpus=0.5, engine={"block_size": 8, "attention_backend": "sdpa"}),
            PoolConfig("decode", "decode", 1, num_cpus=0.5, engine=MODEL_ENGINE),
            PoolConfig("attention", "attention", 2, num_cpus=0.5, engine=ATTN_ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=0),
        transfer=TransferConfig(kind="shm"),
    )

    async def run():
        c = await Controller(cfg, FAST_GROUPS).start()
        try:
            results = await asyncio.gather(*(_collect(c, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.router.refresh_loads()
            await c.check_health()  # one round: the attention workers' stats are polled
            info = c.info()
            # an attention actor dies: the group is replaced as one, with new KV receivers (new
            # addresses, learnt by the new model worker at join); the prefill actor reconnects
            ray.kill(c.workers["attention-0"].actor, no_restart=True)
            await c.check_health()
            for wid in ("decode-0", "attention-0", "attention-1"):
                await c.wait_replaced(wid, timeout=180)
            after = await asyncio.gather(*(_collect(c, f"a{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.check_health()
            return results, info, after, c.info()
        finally:
            await c.shutdown()

    results, info, after, info_after = asyncio.run(run())
    assert [tokens for tokens, _ in after] == expected
    assert {w.worker_id: w.restarts for w in info_after.workers}["decode-0"] == 1  # the group was replaced
    assert all(a.kv_bytes_received > 0 for a in info_after.attention_workers)  # the new receivers took KV
    assert [last.finish_reason for _, last in results] == ["length"] * len(prompts)
    assert [tokens for tokens, _ in results] == expected
    sent = {w.worker_id: w.stats for w in info.workers}["prefill-0"].transfer_bytes
    received = [a.kv_bytes_received for a in info.attention_workers]
    assert sent > 0 and all(b > 0 for b in received) and sum(received) == sent, (sent, received)
