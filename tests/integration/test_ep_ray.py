"""Expert parallelism served by Ray actors: a mixed pool with ``experts=2`` (one EP group of
two DecodeActors, each holding half of every MoE layer's experts, the group formed by the
controller) on the tiny Mixtral, with a routing log (the router's s-TS placement, the ranks'
ExpertFlow fast tier of one expert per layer). Concurrent greedy requests equal engine.LLM's tokens;
GetServerInfo shows each worker's EP rank; a killed member takes its whole group down and the
controller brings the group back (both members restarted, the group formed again), while a
request streaming at the time fails over and finishes with LLM's tokens (no hang, nothing
wrong)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import ray

from cluster.config import PoolConfig, ServeConfig, TransferConfig
from cluster.control.controller import Controller
from cluster.frontends.grpc_server import server_info_message
from cluster.frontends.service import ServerInfo
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from tests.integration.fast_options import FAST_GROUPS
from tests.router_streams import collect

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 8, "num_blocks": 128, "attention_backend": "sdpa"}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


async def _collect(c: Controller, rid: str, prompt: list[int], params: SamplingParams):
    return await collect(c.router, rid, prompt, params)


def test_an_ep_mixed_pool_serves_as_llm_and_comes_back_after_a_member_dies(
    ray_local, tiny_checkpoint, tmp_path
) -> None:
    from expert_router.routing_log import record_routing

    ckpt = tiny_checkpoint("mixtral")  # 4 experts, top-2: 2 per rank
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 9, 30, 12, 3)]
    long_prompt = [rng.randrange(3, 500) for _ in range(10)]
    long_params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    llm = LLM(ckpt, **ENGINE)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    long_expected = llm.generate([long_prompt], long_params)[0].token_ids
    # s-TS placement by the log's token prior in the router; ExpertFlow fast tier (1 of 2
    # experts per layer resident) with the log's path predictor on every rank
    log_path = str(tmp_path / "route.npz")
    record_routing(ckpt, prompts[:3], max_tokens=4).save(log_path)
    pool = PoolConfig(
        "mixed", "mixed", 2, num_cpus=0.5, engine=ENGINE, experts=2, expert_routing_log=log_path, expert_cache_slots=1
    )
    cfg = ServeConfig(
        model=ckpt,
        pools=(pool,),
        transfer=TransferConfig(kind="shm"),
    )

    async def run():
        c = await Controller(cfg, FAST_GROUPS).start()
        try:
            results = await asyncio.gather(*(_collect(c, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.router.refresh_loads()
            info = c.info()

            # a member dies mid-stream: the group is replaced as one, the request fails over
            stream = c.router.generate(RequestSpec("long", long_prompt, long_params))
            first = await anext(stream)
            assert first.token_ids and not first.finished
            ray.kill(c.workers["mixed-1"].actor, no_restart=True)
            rest = [chunk async for chunk in stream]
            for wid in ("mixed-0", "mixed-1"):
                await c.wait_replaced(wid, timeout=180)
            after = await asyncio.gather(*(_collect(c, f"a{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.router.refresh_loads()
            (affinity,) = c.router.policy.affinities
            assert affinity.placed >= 2 * len(prompts) + 1  # every request, failover included
            return results, info, first, rest, after, c.info(), dict(c.router.stats.failovers)
        finally:
            await c.shutdown()

    results, info, first, rest, after, info_after, failovers = asyncio.run(run())
    assert [last.finish_reason for _, last in results] == ["length"] * len(prompts)
    assert [tokens for tokens, _ in results] == expected
    # GetServerInfo: each worker's EP rank in its group of 2; its traffic in details_json
    msg = server_info_message(ServerInfo(cluster=info, inflight=0, max_queue=8))
    assert {w.worker_id: (w.ep_rank, w.ep_world_size) for w in msg.workers} == {"mixed-0": (0, 2), "mixed-1": (1, 2)}
    details = {w["worker_id"]: w["stats"]["expert_parallel"] for w in json.loads(msg.details_json)["workers"]}
    assert all(d["connected"] and d["rounds"] > 0 and d["dispatch_bytes"] > 0 for d in details.values()), details
    caches = [d["cache"] for d in details.values()]  # the fast tier over Ray: counters moved
    assert all(c["slots"] == 1 and c["hits"] + c["misses"] > 0 for c in caches), caches
    assert sum(c["prefetches"] for c in caches) > 0, caches

    assert rest[-1].finish_reason == "length" and rest[-1].error is None, rest[-1]
    assert first.token_ids + [t for ch in rest for t in ch.token_ids] == long_expected
    assert failovers["worker_lost"] >= 1, failovers
    assert {w.worker_id: (w.healthy, w.restarts) for w in info_after.workers} == {
        "mixed-0": (True, 1),  # the living member was restarted with the dead one: its group broke
        "mixed-1": (True, 1),
    }
    assert [tokens for tokens, _ in after] == expected  # the re-formed group serves as before


def test_an_ep_prefill_pool_serves_as_llm_and_comes_back_after_a_member_dies(ray_local, tiny_checkpoint) -> None:
    """``--prefill-experts 2``: the prefill pool is one EP group of two PrefillActors over a
    shared-memory group, each holding half the experts and prefilling its own prompts in
    lock-step; their KV goes to a plain decode worker. The tokens equal engine.LLM's; both
    ranks prefilled; a killed prefill member takes its group down, a stream already decoding
    goes on untouched (its KV had moved), and the re-formed group serves again."""
    ckpt = tiny_checkpoint("mixtral")
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (40, 57, 49, 70, 52, 43)]
    long_prompt = [rng.randrange(3, 500) for _ in range(45)]
    long_params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    llm = LLM(ckpt, **ENGINE)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    long_expected = llm.generate([long_prompt], long_params)[0].token_ids
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 2, num_cpus=0.5, engine=ENGINE, experts=2, group_transport="shm"),
            PoolConfig("decode", "decode", 1, num_cpus=0.5, engine=ENGINE),
        ),
        transfer=TransferConfig(kind="shm"),
    )

    async def run():
        c = await Controller(cfg, FAST_GROUPS).start()
        try:
            results = await asyncio.gather(*(_collect(c, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            await c.router.refresh_loads()
            info = c.info()
            stream = c.router.generate(RequestSpec("long", long_prompt, long_params))
            first = await anext(stream)  # decoding: its KV has moved to the decode worker
            ray.kill(c.workers["prefill-1"].actor, no_restart=True)
            rest = [chunk async for chunk in stream]
            # no request touches the dead member: the health check finds it; wait for the group's
            # replacement to be done (both members restarted and routed again)
            deadline = time.monotonic() + 180
            while not all(w.restarts == 1 and w.healthy for w in c.info().workers if w.pool == "prefill"):
                assert time.monotonic() < deadline, [(w.worker_id, w.restarts, w.healthy) for w in c.info().workers]
                await asyncio.sleep(0.1)  # poll interval
            after = await asyncio.gather(*(_collect(c, f"a{i}", p, GREEDY) for i, p in enumerate(prompts)))
            return results, info, first, rest, after, c.info()
        finally:
            await c.shutdown()

    results, info, first, rest, after, info_after = asyncio.run(run())
    assert [tokens for tokens, _ in results] == expected
    eps = {w.worker_id: w.stats.expert_parallel for w in info.workers if w.pool == "prefill"}
    assert {wid: (e.rank, e.world_size, e.connected) for wid, e in eps.items()} == {
        "prefill-0": (0, 2, True),
        "prefill-1": (1, 2, True),
    }
    assert all(e.rounds > 0 and e.dispatch_bytes > 0 for e in eps.values()), eps
    transfers = {w.worker_id: w.stats.transfer_bytes for w in info.workers if w.pool == "prefill"}
    assert all(b > 0 for b in transfers.values()), transfers  # both ranks prefilled prompts
    assert rest[-1].finish_reason == "length" and rest[-1].error is None, rest[-1]
    assert first.token_ids + [t for ch in rest for t in ch.token_ids] == long_expected
    restarts = {w.worker_id: (w.healthy, w.restarts) for w in info_after.workers}
    assert restarts == {"prefill-0": (True, 1), "prefill-1": (True, 1), "decode-0": (True, 0)}, restarts
    assert [tokens for tokens, _ in after] == expected  # the re-formed group serves as before
