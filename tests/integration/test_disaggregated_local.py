"""Disaggregated serving in one process (LocalCluster): prefill worker -> KV transfer ->
decode worker, compared token for token with the colocated engine.LLM."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.types import RequestSpec, UnknownRequest
from tests.kv_faults import flipped
from tests.router_streams import collect

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 4, "num_blocks": 96, "max_num_batched_tokens": 16}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)  # cannot finish before a cancel


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _config(model: str, kind: str, short: int = 8, **transfer) -> ServeConfig:
    return ServeConfig(
        model=model,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=short),
        transfer=TransferConfig(kind=kind, **transfer),
    )


async def _collect(cluster: LocalCluster, rid: str, prompt: list[int], params: SamplingParams = GREEDY):
    return await collect(cluster.router, rid, prompt, params)


def _pools_full(cluster: LocalCluster, timeout: float = 10.0) -> None:
    """Every worker's pool returns to full: all ENGINE["num_blocks"] blocks free (a pool that
    reports 0 of 0 is not full). Blocks are released asynchronously (a prefill worker frees
    them once its sender reports the transfer done), so poll until a deadline."""
    deadline = time.monotonic() + timeout
    for wid, w in cluster.workers.items():
        while True:
            load = w.stats().engine  # runs on the worker's loop thread, after its pending work
            if load.free_kv_blocks == load.total_kv_blocks or time.monotonic() > deadline:
                break
            w.loop.run(lambda: None)
        assert load.total_kv_blocks == ENGINE["num_blocks"], f"{wid} reports a pool of {load.total_kv_blocks} blocks"
        assert load.free_kv_blocks == load.total_kv_blocks, f"{wid} leaked KV blocks: {load}"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    cache: dict = {}

    def get(family: str, prompts: list[list[int]]) -> list[list[int]]:
        key = (family, tuple(map(tuple, prompts)))
        if key not in cache:
            llm = LLM(tiny_checkpoint(family), **ENGINE)
            cache[key] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        return cache[key]

    return get


@pytest.mark.parametrize(
    "kind,family",
    [("loopback", "llama"), ("shm", "llama"), ("grpc", "llama"), ("torch", "llama"), ("shm", "qwen2_moe")],
)
def test_disaggregated_equals_colocated(tiny_checkpoint, reference, kind, family):
    prompts = _prompts(6, seed=1)
    expected = reference(family, prompts)

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint(family), kind)).start()
        try:
            results = await asyncio.gather(*(_collect(cluster, f"r{i}", p) for i, p in enumerate(prompts)))
            _pools_full(cluster)
            prefill = cluster.workers["prefill-0"]
            return (
                results,
                prefill.engine.scheduler.num_unfinished,
                prefill.stats(),
                cluster.workers["decode-0"].stats(),
            )
        finally:
            cluster.shutdown()

    results, left, prefill, decode = asyncio.run(run())
    for (tokens, last), exp, p in zip(results, expected, prompts, strict=True):
        assert last.finish_reason == "length" and last.error is None
        assert tokens == exp, f"prompt of {len(p)} tokens diverged"
    assert left == 0
    # every prompt of 8 tokens or more really crossed the transport (equal tokens alone would
    # also come from prefilling everything on the decode worker); shorter ones stayed there
    split = sum(len(p) >= 8 for p in prompts)
    assert split > 0 and decode.queue_seconds.count == len(prompts) - split
    assert (prefill.transfer_seconds.count, prefill.transfer_failures, decode.transfer_failures) == (split, 0, 0)


def test_whole_cache_transfer_equals_layerwise(tiny_checkpoint, reference):
    prompts = _prompts(3, seed=2, lo=20)
    expected = reference("llama", prompts)

    chunks: list[tuple[str, int, int]] = []  # (request, layer, first page) of every chunk sent

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback", layerwise=False)).start()
        prefill = cluster.workers["prefill-0"]
        real_factory = prefill._sender_factory

        def recording_factory():
            sender = real_factory()
            sender.fault_hook = lambda chunk: chunks.append((chunk.request_id, chunk.layer, chunk.first_page)) or chunk
            return sender

        prefill._sender_factory = recording_factory
        try:
            return await asyncio.gather(*(_collect(cluster, f"w{i}", p) for i, p in enumerate(prompts))), prefill
        finally:
            cluster.shutdown()

    results, prefill = asyncio.run(run())
    assert [t for t, _ in results] == expected
    # whole-cache mode: each request is one chunk per layer, from page 0, although every
    # prompt (>= 20 tokens, budget 16) took several prefill steps (layer-wise would send more)
    layers = prefill.engine.layout.num_layers
    assert sorted(chunks) == sorted((f"w{i}", layer, 0) for i in range(len(prompts)) for layer in range(layers))


def test_aborts_and_cancels_return_pools_to_full(tiny_checkpoint):
    """Many requests, a third cancelled mid-stream by the caller: no KV block leaks anywhere."""
    prompts = _prompts(12, seed=3)

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback")).start()
        try:

            async def cancel_after_two(i, p):
                got, finished = 0, False
                async for chunk in cluster.router.generate(RequestSpec(f"c{i}", p, LONG)):
                    got += len(chunk.token_ids)
                    finished = chunk.finished
                    if got >= 2:
                        break  # the caller walks away: the router must abort on both workers
                return got, finished

            tasks = [
                cancel_after_two(i, p) if i % 3 == 0 else _collect(cluster, f"c{i}", p) for i, p in enumerate(prompts)
            ]
            results = await asyncio.gather(*tasks)
            _pools_full(cluster)
            decode = cluster.workers["decode-0"]
            gone = []
            for i in range(0, len(prompts), 3):  # a cancelled request is gone from the decode worker
                with pytest.raises(UnknownRequest):
                    decode.read(f"c{i}", 0, 0)
                gone.append(f"c{i}")
            return results, dict(cluster.router.requests), gone
        finally:
            cluster.shutdown()

    results, inflight, gone = asyncio.run(run())
    # cancelled mid-stream: at least the two tokens read, far from the LONG budget, not finished
    assert all(2 <= got < LONG.max_tokens and not finished for got, finished in results[::3]), results[::3]
    assert len(gone) == 4 and inflight == {}
    finished = [r for i, r in enumerate(results) if i % 3]  # every request not cancelled (8 of 12)
    assert len(finished) == 8
    assert all(len(t) == GREEDY.max_tokens and last.finish_reason == "length" for t, last in finished)


def test_corrupted_transfer_fails_loudly_and_frees_blocks(tiny_checkpoint, reference):
    """Every transfer corrupted: each one is retried with a fresh transfer (failover), and
    after the bounded retries the stream ends with an explicit error naming the checksum.
    The tokens the caller got on the way (each placement's prefill sampled one) are right."""
    prompt = _prompts(1, seed=4, lo=30)[0]

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback")).start()
        prefill = cluster.workers["prefill-0"]
        real_factory = prefill._sender_factory

        def corrupting_factory():
            sender = real_factory()
            sender.fault_hook = flipped
            return sender

        prefill._sender_factory = corrupting_factory
        try:
            tokens, last = await _collect(cluster, "bad", prompt)
            _pools_full(cluster)
            return tokens, last
        finally:
            cluster.shutdown()

    tokens, last = asyncio.run(run())
    assert last.finished and last.finish_reason == "abort"
    assert "checksum" in (last.error or "").lower()
    retries = ServeConfig(model="m").failover.max_retries
    assert f"failed on {retries + 1} placements" in last.error
    # one token per placement (its prefill's), each the continuation of the ones before
    assert tokens == reference("llama", [prompt])[0][: retries + 1]


def test_first_token_can_finish_request(tiny_checkpoint):
    prompt = _prompts(1, seed=5, lo=20)[0]

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback")).start()
        try:
            out = await _collect(cluster, "one", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            _pools_full(cluster)
            return out
        finally:
            cluster.shutdown()

    tokens, last = asyncio.run(run())
    assert len(tokens) == 1 and last.finish_reason == "length"


def test_invalid_request_is_refused_without_leak(tiny_checkpoint):
    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback")).start()
        try:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await _collect(cluster, "bad-id", [1, 2, 10**6] * 5)
            _pools_full(cluster)
        finally:
            cluster.shutdown()

    asyncio.run(run())


def test_generation_longer_than_the_decode_pool_ends_with_length(tiny_checkpoint):
    """Prompt + max_tokens beyond the decode worker's KV: the stream ends ("length"), never stalls."""
    prompt = _prompts(1, seed=6, lo=40, hi=40)[0]

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback")).start()
        try:
            params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
            out = await asyncio.wait_for(_collect(cluster, "long", prompt, params), 120)
            _pools_full(cluster)
            return out
        finally:
            cluster.shutdown()

    tokens, last = asyncio.run(run())
    capacity = ENGINE["num_blocks"] * ENGINE["block_size"]
    assert last.finish_reason == "length" and len(prompt) + len(tokens) == capacity + 1


def test_prefix_cache_hits_of_the_prefill_reach_the_client(tiny_checkpoint):
    """A repeated prompt is served from the prefill worker's prefix cache, and the count of
    cached prompt tokens travels through the decode worker to the last chunk (usage)."""
    prompt = _prompts(1, seed=7, lo=40, hi=40)[0]  # 10 full blocks of 4; 9 can hit (one token is computed)

    async def run():
        cluster = await LocalCluster(_config(tiny_checkpoint("llama"), "loopback")).start()
        try:
            first = await _collect(cluster, "a", prompt)
            _pools_full(cluster)
            second = await _collect(cluster, "b", prompt)
            return first, second
        finally:
            cluster.shutdown()

    (t1, last1), (t2, last2) = asyncio.run(run())
    assert t1 == t2
    assert last1.num_cached_tokens == 0
    assert last2.num_cached_tokens == 36  # 9 blocks x 4 tokens, counted where the prompt was prefilled


def test_prefix_policy_routes_a_prompt_to_the_worker_that_caches_it(tiny_checkpoint):
    """Two mixed workers; decode-1 alone holds the prompt's blocks. The "prefix" policy sends
    the prompt there (a load-only policy would pick decode-0, the lower id, on equal load)."""
    model = tiny_checkpoint("llama")
    cfg = ServeConfig(
        model=model,
        pools=(PoolConfig("decode", "mixed", 2, engine=ENGINE),),
        router=RouterConfig(prefill_policy="prefix", decode_policy="prefix", short_prompt_threshold=1000),
        transfer=TransferConfig(kind="loopback"),
    )
    prompt = _prompts(1, seed=8, lo=33, hi=33)[0]

    async def run():
        cluster = await LocalCluster(cfg).start()
        try:
            warm = cluster.workers["decode-1"]  # fill decode-1's prefix cache behind the router's back
            warm.generate_local(RequestSpec("warm", prompt, GREEDY))
            deadline = time.monotonic() + 30
            while not warm.read("warm", 0, 5).finished:  # read() blocks up to 5 s for news
                assert time.monotonic() < deadline, "the warm-up request did not finish"
            await cluster.router.refresh_loads()
            hashes = cluster.router.prefix_hashes(prompt)
            held = {wid: len(set(hashes) & w.stats.cached_block_hashes) for wid, w in cluster.router.workers.items()}
            chosen = []
            route = cluster.router.policy.route

            def recording(*a, **kw):
                decision = route(*a, **kw)
                chosen.append(decision.decode_worker)
                return decision

            cluster.router.policy.route = recording
            tokens, last = await _collect(cluster, "r", prompt)
            return hashes, held, chosen, last
        finally:
            cluster.shutdown()

    hashes, held, chosen, last = asyncio.run(run())
    assert len(hashes) == 8 and held == {"decode-0": 0, "decode-1": 8}
    assert chosen == ["decode-1"]
    assert last.num_cached_tokens == 32
