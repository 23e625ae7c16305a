"""An expert-parallel pool in the in-process LocalCluster: mixed, as the decode pool of a
disaggregated cluster (prompts prefilled by a prefill worker holding every expert, their KV
moved to an EP rank), or as the prefill pool (``--prefill-experts``: two prefill workers, each
holding half the experts, prefilling their own prompts in lock-step, their KV moved to a
decode worker): the router places concurrent requests on either EP rank, the tokens equal
engine.LLM's, ClusterInfo shows the ranks, and replacing one member alone is refused (a group
is replaced as a whole)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.runtime import groups
from tests.router_streams import CancelledMidway, collect_ok

ENGINE = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa", "skip_tokenizer_init": True}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 59)), [5, 9, 2, 7], list(range(60, 90))]


async def _collect(cluster: LocalCluster, rid: str, prompt: list[int]) -> list[int]:
    return await collect_ok(cluster.router, rid, prompt, GREEDY)


@pytest.mark.parametrize(
    ("layout", "transport"),
    [("mixed", "auto"), ("prefill+ep-decode", "auto"), ("mixed", "shm"), ("ep-prefill+decode", "shm")],
    ids=["mixed", "prefill+ep-decode", "mixed-shm-group", "ep-prefill+decode-shm-group"],
)
def test_ep_pool_in_process_serves_as_llm(tiny_checkpoint, monkeypatch, layout: str, transport: str) -> None:
    ckpt = tiny_checkpoint("qwen2_moe")
    shm_ranks: list[int] = []  # the ranks that joined a shared-memory group (engine/runtime/shm_group.py)
    real_join_shm = groups.join_shm
    monkeypatch.setattr(groups, "join_shm", lambda *a, **k: shm_ranks.append(a[1]) or real_join_shm(*a, **k))
    disaggregated = layout != "mixed"
    ep_pool_name = "prefill" if layout == "ep-prefill+decode" else "mixed"
    if layout == "ep-prefill+decode":
        pools = (
            PoolConfig("prefill", "prefill", 2, engine=ENGINE, experts=2, group_transport=transport),
            PoolConfig("mixed", "decode", 1, engine=ENGINE),
        )
    else:
        ep_pool = PoolConfig("mixed", "decode" if disaggregated else "mixed", 2, engine=ENGINE, experts=2)
        ep_pool = dataclasses.replace(ep_pool, group_transport=transport)
        pools = (PoolConfig("prefill", "prefill", 1, engine=ENGINE), ep_pool) if disaggregated else (ep_pool,)
    cfg = ServeConfig(
        model=ckpt,
        pools=pools,
        router=RouterConfig(short_prompt_threshold=0 if disaggregated else 32),  # 0: every prompt transfers
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            gone = CancelledMidway(cluster.router, "gone", PROMPTS[0]).start()  # a client that goes away mid-stream
            got = await asyncio.gather(*(_collect(cluster, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            await gone.cancel()
            # every KV block free again on every worker (aborts land between lock-step iterations)
            deadline = asyncio.get_running_loop().time() + 30.0
            while True:
                await cluster.router.refresh_loads()
                info = cluster.info()
                full = all(w.stats.engine.free_kv_blocks == w.stats.engine.total_kv_blocks for w in info.workers)
                if full or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)  # poll interval
            assert full, [(w.worker_id, w.stats.engine.free_kv_blocks) for w in info.workers]
            assert len(cluster.router.requests) == 0
            with pytest.raises(NotImplementedError, match="replaced as a whole"):
                cluster.replace_worker(f"{ep_pool_name}-1")
            return got, info
        finally:
            await cluster.stop()

    got, info = asyncio.run(run())
    assert got == [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, GREEDY)]
    assert sorted(shm_ranks) == (list(range(2)) if transport == "shm" else [])
    eps = {w.worker_id: w.stats.expert_parallel for w in info.workers if w.pool == ep_pool_name}
    if layout == "prefill+ep-decode":  # the prefill worker prefilled every prompt and sent its KV to an EP rank
        (prefill,) = (w.stats for w in info.workers if w.pool == "prefill")
        assert prefill.expert_parallel is None and prefill.transfer_bytes > 0
    if layout == "ep-prefill+decode":  # both EP prefill ranks prefilled prompts and sent their KV
        prefills = [w.stats for w in info.workers if w.pool == "prefill"]
        assert all(p.transfer_bytes > 0 for p in prefills), [p.transfer_bytes for p in prefills]
        (decode,) = (w.stats for w in info.workers if w.pool == "mixed")
        assert decode.expert_parallel is None
    assert {wid: (e.rank, e.world_size, e.connected) for wid, e in eps.items()} == {
        f"{ep_pool_name}-0": (0, 2, True),
        f"{ep_pool_name}-1": (1, 2, True),
    }
    assert all(e.rounds > 0 and e.tokens > 0 for e in eps.values()), eps  # both ranks ran requests


def test_ep_pool_with_sts_routing_log_places_by_prior_and_serves_as_llm(tiny_checkpoint, tmp_path) -> None:
    """With an ``expert_routing_log`` the router places every request by the log's token prior
    (cluster/control/expert_affinity.py) and, with ``expert_cache_slots``, every rank's fast
    tier runs ExpertFlow's predictor fitted on the same log; the tokens are still engine.LLM's."""
    from expert_router.routing_log import record_routing

    ckpt = tiny_checkpoint("qwen2_moe")
    log_path = str(tmp_path / "route.npz")
    log = record_routing(ckpt, PROMPTS[:3], max_tokens=4)
    assert log.token_ids is not None and log.token_ids.tolist()[: len(PROMPTS[0])] == PROMPTS[0]
    log.save(log_path)
    pool = PoolConfig("ep", "mixed", 2, engine=ENGINE, experts=2, expert_routing_log=log_path, expert_cache_slots=1)
    cfg = ServeConfig(model=ckpt, pools=(pool,), transfer=TransferConfig(kind="loopback"))

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            (affinity,) = cluster.router.policy.affinities
            got = await asyncio.gather(*(_collect(cluster, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            await cluster.router.refresh_loads()
            caches = [w.stats.expert_parallel.cache for w in cluster.info().workers]
            return got, affinity.placed, caches
        finally:
            await cluster.stop()

    got, placed, caches = asyncio.run(run())
    assert placed == len(PROMPTS)  # every request placed by the prior, none by the usual policy
    assert [c.slots for c in caches] == [1, 1] and sum(c.prefetches for c in caches) > 0, caches
    assert got == [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, GREEDY)]
