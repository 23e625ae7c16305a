"""Attention offload served in process: LocalCluster with one mixed worker (the model worker)
and an attention pool of 2 workers holding its KV. Concurrent greedy requests through the
router equal engine.LLM; the model worker's KV pool is the attention workers' total; ClusterInfo
shows the attention workers' blocks; every pool is full again afterwards; shutdown ends the
attention workers' loops with CLOSE."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.llm import build_engine_config
from engine.runtime import groups
from engine.types import RequestSpec
from tests.router_streams import collect_ok

MODEL_ENGINE = {
    "block_size": 8,
    "attention_backend": "sdpa",
    "skip_tokenizer_init": True,
    "enable_prefix_caching": False,
}
ATTN_BLOCKS = 24  # per attention worker
ATTN_ENGINE = {"block_size": 8, "num_blocks": ATTN_BLOCKS, "attention_backend": "sdpa"}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 59)), [5, 9, 2, 7], list(range(60, 90))]


async def _collect(cluster: LocalCluster, rid: str, prompt: list[int]) -> list[int]:
    return await collect_ok(cluster.router, rid, prompt, GREEDY)


@pytest.mark.parametrize("transport", ["auto", "shm"], ids=["gloo-group", "shm-group"])
def test_attention_pool_in_process_serves_as_llm(tiny_checkpoint, monkeypatch, transport: str) -> None:
    ckpt = tiny_checkpoint("llama")
    shm_ranks: list[int] = []  # the ranks that joined a shared-memory group (engine/runtime/shm_group.py)
    real_join_shm = groups.join_shm
    monkeypatch.setattr(groups, "join_shm", lambda *a, **k: shm_ranks.append(a[1]) or real_join_shm(*a, **k))
    attention = {**ATTN_ENGINE, "num_blocks": ATTN_BLOCKS}
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("mixed", "mixed", 1, engine=MODEL_ENGINE),
            PoolConfig("attention", "attention", 2, engine=attention, group_transport=transport),
        ),
        router=RouterConfig(short_prompt_threshold=1024),  # every prompt prefills on the model worker
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            got = await asyncio.gather(*(_collect(cluster, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            # the model worker's engine frees the shards' pages; its load report reaches the
            # router asynchronously: poll until every attention worker's pages read as free
            deadline = asyncio.get_running_loop().time() + 30.0
            while True:
                await cluster.router.refresh_loads()
                info = cluster.info()
                workers = info.attention_workers  # none listed would make all() vacuous
                full = bool(workers) and all(
                    info.attention_free_blocks(a) == a.total_blocks > 0 and a.live_contexts == 0 and a.batches > 0
                    for a in workers
                )
                if full or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)  # poll interval
            assert full, info.attention_workers
            with pytest.raises(NotImplementedError, match="replaced as one group"):
                cluster.replace_worker("mixed-0")
            # the frontend refuses a request longer than one attention worker holds (a request is whole on one)
            assert cluster.router.limits.num_kv_blocks == ATTN_BLOCKS
            counters = cluster.workers["mixed-0"].attention.transport.counters
            assert counters.payload_out > 0 and counters.payload_in > 0  # attention ran remotely
        finally:
            await cluster.stop()
        # the model worker's CLOSE ended both attention workers' loops
        assert [w.stats().state for w in cluster.attention.values()] == ["closed", "closed"]
        return got, info

    got, info = asyncio.run(run())
    ref = LLM(ckpt, **{**MODEL_ENGINE, "num_blocks": 2 * ATTN_BLOCKS}).generate(PROMPTS, GREEDY)
    assert sorted(shm_ranks) == (list(range(3)) if transport == "shm" else [])
    assert got == [o.token_ids for o in ref]
    (model,) = info.workers
    # the model worker's pool accounts for the attention workers' blocks (its own KV: none)
    assert model.stats.engine.total_kv_blocks == 2 * ATTN_BLOCKS
    assert model.stats.engine.free_kv_blocks == 2 * ATTN_BLOCKS
    # its report: every attention tensor counted (q, k, v out and the output back, fp32), all pages back
    rep, mc = model.stats.attention, build_engine_config(ckpt).model
    assert rep.connected and rep.attention_workers == 2 and rep.tokens > 0
    assert rep.payload_bytes == rep.tokens * (2 * mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * 4
    assert rep.used_blocks == (0, 0) and rep.total_blocks == (ATTN_BLOCKS, ATTN_BLOCKS) and rep.max_load == 0.0
    assert 0.0 < rep.wait_seconds < rep.step_seconds
    assert [(a.worker_id, a.state, a.total_blocks) for a in info.attention_workers] == [
        ("attention-0", "serving", ATTN_BLOCKS),
        ("attention-1", "serving", ATTN_BLOCKS),
    ]
    assert {p.name: (p.role, p.workers) for p in info.pools}["attention"] == (
        "attention",
        ("attention-0", "attention-1"),
    )


def test_an_idle_model_worker_keeps_its_attention_workers_alive(tiny_checkpoint) -> None:
    """A group timeout of 1 s and 3 s without a request: the model worker's loop tick pings
    the attention workers (every 0.25 s), so they still serve afterwards."""
    ckpt = tiny_checkpoint("llama")
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("mixed", "mixed", 1, engine=MODEL_ENGINE),
            PoolConfig("attention", "attention", 2, engine=ATTN_ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=1024),
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=1.0).start()
        try:
            await asyncio.sleep(3.0)  # the idle period under test (three group timeouts)
            states = [a.state for a in cluster.info().attention_workers]
            got = await _collect(cluster, "r0", PROMPTS[2])
            pings = cluster.workers["mixed-0"].attention.pings
        finally:
            await cluster.stop()
        return states, got, pings

    states, got, pings = asyncio.run(run())
    assert states == ["serving", "serving"]
    assert pings >= 8
    ref = LLM(ckpt, **{**MODEL_ENGINE, "num_blocks": 2 * ATTN_BLOCKS}).generate([PROMPTS[2]], GREEDY)
    assert got == ref[0].token_ids


def test_a_tight_attention_pool_serves_every_stream(tiny_checkpoint) -> None:
    """2 attention workers x 6 blocks of 8 tokens, 5 concurrent requests growing to 46 tokens:
    every stream completes and equals engine.LLM, and the frontend's per-request limit is one
    attention worker's blocks. How much the requests overlap depends on arrival timing (the
    tiny model is fast), so preemption is not asserted here: the deterministic regression
    (the engine used to admit against the total and fail the step with AttentionShardFull) is
    tests/unit/attention_offload/test_per_shard_admission.py."""
    ckpt = tiny_checkpoint("llama")
    tight = 6
    long = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)  # 30 + 16 = 46 <= 48 tokens
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("mixed", "mixed", 1, engine=MODEL_ENGINE),
            PoolConfig("attention", "attention", 2, engine={**ATTN_ENGINE, "num_blocks": tight}),
        ),
        router=RouterConfig(short_prompt_threshold=1024),
        transfer=TransferConfig(kind="loopback"),
    )

    async def collect(cluster: LocalCluster, rid: str, prompt: list[int]) -> list[int]:
        tokens = []
        async for chunk in cluster.router.generate(RequestSpec(rid, prompt, long)):
            assert chunk.error is None, chunk.error
            tokens += chunk.token_ids
        return tokens

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            got = await asyncio.gather(*(collect(cluster, f"r{i}", p) for i, p in enumerate(PROMPTS)))
            stats = cluster.info().workers[0].stats.engine
            limit = cluster.router.limits.max_context_tokens
        finally:
            await cluster.stop()
        return got, stats, limit

    got, stats, limit = asyncio.run(run())
    ref = LLM(ckpt, **{**MODEL_ENGINE, "num_blocks": 2 * tight}).generate(PROMPTS, long)
    assert got == [o.token_ids for o in ref]
    assert stats.free_kv_blocks == stats.total_kv_blocks == 2 * tight
    assert limit == tight * 8  # one attention worker's blocks: what one request can hold


def test_prefix_caching_and_speculation_on_the_model_worker(tiny_checkpoint) -> None:
    """The model worker's engine owns the attention workers' pages: with its prefix cache and
    n-gram speculation on, a second wave of prompts sharing the first wave's prefixes hits the
    cache (on the attention worker holding it), drafts are verified on the attention workers,
    and every stream equals engine.LLM with the same features."""
    ckpt = tiny_checkpoint("llama")
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "policy": "fixed", "prompt_lookup_min": 1}
    engine = {**MODEL_ENGINE, "enable_prefix_caching": True, "speculative_config": ngram}
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("mixed", "mixed", 1, engine=engine),
            PoolConfig("attention", "attention", 2, engine=ATTN_ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=1024),
        transfer=TransferConfig(kind="loopback"),
    )
    shared = [list(range(3, 27)), [9, 8, 7, 6] * 6]  # 3 full blocks each
    wave1 = [shared[0] + [1], shared[1] + [2, 3]]
    wave2 = [shared[0] + [4, 5], shared[1] + [6], shared[0] + [7]]

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            got1 = await asyncio.gather(*(_collect(cluster, f"a{i}", p) for i, p in enumerate(wave1)))
            got2 = await asyncio.gather(*(_collect(cluster, f"b{i}", p) for i, p in enumerate(wave2)))
            await cluster.router.refresh_loads()
            stats = cluster.info().workers[0].stats
        finally:
            await cluster.stop()
        return got1, got2, stats

    got1, got2, stats = asyncio.run(run())
    llm = LLM(ckpt, **{**engine, "num_blocks": 2 * ATTN_BLOCKS})
    assert got1 == [o.token_ids for o in llm.generate(wave1, GREEDY)]
    assert got2 == [o.token_ids for o in llm.generate(wave2, GREEDY)]
    assert stats.engine.prefix_cache_hits >= 3 * 3  # each wave-2 prompt's 3 shared blocks
    assert stats.speculation is not None and stats.speculation.proposed_tokens > 0
    assert stats.attention.used_blocks == (0, 0) and stats.engine.free_kv_blocks == 2 * ATTN_BLOCKS
