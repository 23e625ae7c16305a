"""Attention offload served by Ray actors: a mixed pool of one DecodeActor (the model worker,
an OffloadedEngine) and an attention pool of two AttentionActors holding its KV, the group
formed by the controller, on the tiny Llama. Concurrent greedy requests equal engine.LLM's
tokens; GetServerInfo shows the attention workers and their KV blocks; an attention worker
killed mid-stream takes its group down (the model worker's next step fails within the group's
timeout: no wrong token, no hang), the controller replaces the group as one, and the request
that was streaming fails over and finishes with LLM's tokens. A second case serves a prefill
pool and two model workers with two attention actors each: an attention actor's death replaces
only its own group while the other model worker serves on."""

from __future__ import annotations

import asyncio
import random
import time

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


def test_a_prefill_pool_pushes_kv_to_the_attention_actors_of_two_model_workers(ray_local, tiny_checkpoint) -> None:
    """A prefill actor, a decode pool of two model workers and four attention actors, two per
    model worker (attn/decode-0: attention-0/1, attn/decode-1: attention-2/3), over shm: every
    prompt is transferred (short_prompt_threshold 0), its KV going from the prefill actor straight
    to an attention actor of the model worker it was placed on; streams equal engine.LLM, both
    model workers served, every byte sent landed on an attention actor. attention-0 dies: only
    its group is replaced (decode-0, attention-0/1 restart once) while decode-1 serves the same
    prompts as LLM meanwhile and its group is never restarted; afterwards both serve as LLM."""
    ckpt = tiny_checkpoint("llama")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 9, 30, 12, 3, 21, 8)]
    expected = [o.token_ids for o in LLM(ckpt, **MODEL_ENGINE, num_blocks=2 * ATTN_BLOCKS).generate(prompts, GREEDY)]
    cpus = 0.25  # 7 actors on the module's 2 CPUs
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 1, num_cpus=cpus, engine={"block_size": 8, "attention_backend": "sdpa"}),
            PoolConfig("decode", "decode", 2, num_cpus=cpus, engine=MODEL_ENGINE),
            PoolConfig("attention", "attention", 4, num_cpus=cpus, engine=ATTN_ENGINE),
        ),
        # concurrent requests alternate between the model workers (fewest in flight)
        router=RouterConfig(short_prompt_threshold=0, decode_policy="jsq"),
        transfer=TransferConfig(kind="shm"),
    )
    groups = {"decode-0": ("attention-0", "attention-1"), "decode-1": ("attention-2", "attention-3")}

    async def run():
        c = await Controller(cfg, FAST_GROUPS).start()
        try:
            results = await asyncio.gather(*(_collect(c, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.router.refresh_loads()
            await c.check_health()  # one round: the attention workers' stats are polled
            info = c.info()
            # an attention actor of decode-0 dies: its group alone is replaced, with new KV
            # receivers (new addresses, learnt by the new model worker at join)
            ray.kill(c.workers["attention-0"].actor, no_restart=True)
            deadline = time.monotonic() + 30.0
            while not {w.worker_id: w.restarting for w in c.info().workers}["decode-0"]:
                assert time.monotonic() < deadline, "the dead attention worker's group was never replaced"
                await c.check_health()  # the watcher runs rounds too; this one may notice first
            replacing = {w.worker_id: w.restarting for w in c.info().workers}
            during = await asyncio.gather(*(_collect(c, f"d{i}", p, GREEDY) for i, p in enumerate(prompts)))
            for wid in ("decode-0", *groups["decode-0"]):
                await c.wait_replaced(wid, timeout=180)
            after = await asyncio.gather(*(_collect(c, f"a{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.router.refresh_loads()
            await c.check_health()
            restarts = {wid: rec.restarts for wid, rec in c.workers.items()}
            return results, info, replacing, during, after, c.info(), restarts
        finally:
            await c.shutdown()

    results, info, replacing, during, after, info_after, restarts = asyncio.run(run())
    assert [last.finish_reason for _, last in results] == ["length"] * len(prompts)
    assert [tokens for tokens, _ in results] == expected
    assert info.attention_groups == info_after.attention_groups
    assert {p.model_worker: p.attention_workers for p in info.attention_groups} == groups
    by_id = {w.worker_id: w.stats for w in info.workers}
    assert all(by_id[m].attention.tokens > 0 for m in groups), by_id  # both model workers served
    sent = by_id["prefill-0"].transfer_bytes
    received = {a.worker_id: a.kv_bytes_received for a in info.attention_workers}
    assert sent > 0 and sum(received.values()) == sent, (sent, received)
    assert all(sum(received[a] for a in attention) > 0 for attention in groups.values()), received
    # while attn/decode-0 was being replaced, decode-1 served every request as LLM
    assert replacing == {"prefill-0": False, "decode-0": True, "decode-1": False}
    assert [tokens for tokens, _ in during] == expected
    # only the broken group was restarted
    assert restarts == {
        "prefill-0": 0,
        "decode-0": 1,
        "attention-0": 1,
        "attention-1": 1,
        "decode-1": 0,
        "attention-2": 0,
        "attention-3": 0,
    }
    assert [tokens for tokens, _ in after] == expected
    assert {a.worker_id: a.state for a in info_after.attention_workers} == dict.fromkeys(received, "serving")
    # the new receivers took KV (both model workers serve again: 8 prompts, JSQ over two)
    by_id_after = {w.worker_id: w.stats for w in info_after.workers}
    assert all(by_id_after[m].attention.tokens > 0 for m in groups), by_id_after
