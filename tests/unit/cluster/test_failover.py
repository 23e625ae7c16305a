"""Failover in one process (LocalCluster, loopback transport, tiny model): a request whose
worker dies, whose KV arrives corrupted, or whose worker is full, continues on another
placement with every emitted token re-prefilled; the caller's stream has no token twice and
none missing, and equals the uninterrupted greedy output of engine.LLM. Retries are bounded
and counted; the journal holds what the caller saw; a request resumes from its journal in a
new router (a restart) and a finished one is replayed, never generated again."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from cluster.config import FailoverConfig, PoolConfig, RouterConfig, ServeConfig, StateConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.control.routing import NoWorkerAvailable, WorkersBusy
from cluster.control.state import InMemoryStateStore
from engine import LLM, SamplingParams
from engine.types import RequestSpec

ENGINE = {"block_size": 4, "num_blocks": 128, "max_num_batched_tokens": 32}
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SHORT = 8  # prompts shorter than this are prefilled on the decode worker


def _prompts(n: int, seed: int, lo: int = 12, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _config(model: str, decode: int = 2, prefill: int = 1, **failover) -> ServeConfig:
    return ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", prefill, engine=ENGINE),
            PoolConfig("decode", "decode", decode, engine=ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=SHORT, decode_policy="jsq"),
        transfer=TransferConfig(kind="loopback", timeout_s=5.0),
        failover=FailoverConfig(**{"wait_for_worker_s": 30.0, **failover}),
    )


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference(model):
    llm = LLM(model, **ENGINE)
    cache: dict = {}

    def get(prompts: list[list[int]], params: SamplingParams = LONG) -> list[list[int]]:
        key = (tuple(map(tuple, prompts)), params)
        if key not in cache:
            cache[key] = [o.token_ids for o in llm.generate(prompts, params)]
        return cache[key]

    return get


class Stream:
    """Consumes one request, recording every chunk. With ``hold_at`` it stops pulling once it
    has that many tokens, until ``release()``: the router reads nothing meanwhile, so a fault
    injected then hits the request mid-stream, whatever the worker generated ahead."""

    def __init__(
        self, cluster: LocalCluster, rid: str, prompt: list[int], params: SamplingParams = LONG, hold_at: int = 0
    ):
        self.chunks = []
        self.tokens: list[int] = []
        self.hold_at = hold_at
        self.held = asyncio.Event()
        self._release = asyncio.Event()
        self.task = asyncio.create_task(self._run(cluster, RequestSpec(rid, prompt, params)))

    async def _run(self, cluster, spec):
        async for chunk in cluster.router.generate(spec):
            self.chunks.append(chunk)
            self.tokens += chunk.token_ids
            if self.hold_at and len(self.tokens) >= self.hold_at and not self._release.is_set():
                self.held.set()
                await self._release.wait()
        return self.chunks[-1]

    async def until_held(self) -> None:
        await asyncio.wait_for(self.held.wait(), 60)

    def release(self) -> None:
        self._release.set()


def _assert_pools_full(cluster: LocalCluster) -> None:
    for wid, w in cluster.workers.items():
        if wid in cluster.killed:
            continue
        for _ in range(200):  # a prefill worker frees blocks once its transfer settles
            load = w.stats().engine
            if load.free_kv_blocks == load.total_kv_blocks:
                break
            w.loop.run(lambda: None)
        assert load.free_kv_blocks == load.total_kv_blocks == ENGINE["num_blocks"], f"{wid} leaked: {load}"


def test_decode_death_mid_stream_moves_requests_to_the_spare_decode_worker(model, reference):
    prompts = _prompts(4, seed=1)
    expected = reference(prompts)

    async def run():
        cluster = await LocalCluster(_config(model, decode=2)).start()
        try:
            streams = [Stream(cluster, f"r{i}", p, hold_at=6) for i, p in enumerate(prompts)]
            await asyncio.gather(*(s.until_held() for s in streams))
            victim = cluster.router.requests["r0"].routes[-1].decode_worker
            on_victim = {k for k, led in cluster.router.by_key.items() if led.routes[-1].decode_worker == victim}
            await cluster.kill_worker(victim)
            for s in streams:
                s.release()
            lasts = await asyncio.gather(*(s.task for s in streams))
            _assert_pools_full(cluster)
            return streams, lasts, victim, on_victim, cluster.router.stats
        finally:
            await cluster.stop()

    streams, lasts, victim, on_victim, stats = asyncio.run(run())
    assert [s.tokens for s in streams] == expected  # every token once, in order, argmax-equal
    assert all(last.finish_reason == "length" and last.error is None for last in lasts)
    assert stats.failovers["worker_lost"] == len(on_victim) >= 1
    assert stats.recovery_seconds.count == len(on_victim)
    assert sum(stats.exhausted.values()) == 0 and stats.waits == 0  # the spare took them at once


def test_single_decode_worker_death_waits_for_its_replacement(model, reference):
    prompts = _prompts(3, seed=2)
    expected = reference(prompts)

    async def run():
        cluster = await LocalCluster(_config(model, decode=1)).start()
        try:
            streams = [Stream(cluster, f"r{i}", p, hold_at=5) for i, p in enumerate(prompts)]
            await asyncio.gather(*(s.until_held() for s in streams))
            await cluster.kill_worker("decode-0")
            for s in streams:
                s.release()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 25.0  # within the requests' wait_for_worker_s (30 s)
            while cluster.router.stats.waiting < len(prompts):  # all of them wait for a worker
                assert loop.time() < deadline, (cluster.router.stats, [len(s.tokens) for s in streams])
                await asyncio.sleep(0.02)  # poll interval
            during = [len(s.tokens) for s in streams]
            cluster.replace_worker("decode-0")  # the controller's replacement arrives
            lasts = await asyncio.gather(*(s.task for s in streams))
            _assert_pools_full(cluster)
            return streams, lasts, during, cluster.router.stats
        finally:
            await cluster.stop()

    streams, lasts, during, stats = asyncio.run(run())
    assert all(n < LONG.max_tokens for n in during)  # they were cut mid-stream
    assert [s.tokens for s in streams] == expected
    assert all(last.finish_reason == "length" for last in lasts)
    assert stats.waits == 3 and stats.failovers["worker_lost"] == 3


def test_prefill_death_before_the_first_token_retries_elsewhere(model, reference):
    prompts = _prompts(2, seed=3, lo=30, hi=40)
    expected = reference(prompts)

    async def run():
        cluster = await LocalCluster(_config(model, decode=1, prefill=2)).start()
        try:
            await cluster.kill_worker("prefill-0")  # dead before anything was placed on it
            cluster.router.mark_healthy("prefill-0")  # ... but the router has not noticed yet
            streams = [Stream(cluster, f"r{i}", p) for i, p in enumerate(prompts)]
            lasts = await asyncio.gather(*(s.task for s in streams))
            _assert_pools_full(cluster)
            return streams, lasts, cluster.router.stats, [led for led in cluster.router.by_key]
        finally:
            await cluster.stop()

    streams, lasts, stats, inflight = asyncio.run(run())
    assert [s.tokens for s in streams] == expected and inflight == []
    assert stats.failovers["worker_lost"] >= 1 and sum(stats.exhausted.values()) == 0


def test_a_corrupted_transfer_is_retried_with_a_fresh_one(model, reference, caplog):
    prompt = _prompts(1, seed=4, lo=30, hi=30)[0]
    corrupted = []

    def corrupt_first_transfer(chunk):
        if corrupted and chunk.request_id != corrupted[0]:
            return chunk
        corrupted[:1] = [chunk.request_id]
        payload = chunk.payload.clone()
        payload.view(-1).view(dtype=__import__("torch").uint8)[0] ^= 0xFF
        return type(chunk)(**{**chunk.__dict__, "payload": payload})

    async def run():
        cluster = await LocalCluster(
            _config(model, decode=1), transport_options={"fault_hook": corrupt_first_transfer}
        ).start()
        try:
            s = Stream(cluster, "c", prompt)
            last = await s.task
            _assert_pools_full(cluster)
            return s, last, cluster.router.stats, await cluster.store.journal_load("c")
        finally:
            await cluster.stop()

    with caplog.at_level("WARNING"):
        s, last, stats, record = asyncio.run(run())
    assert s.tokens == reference([prompt])[0] and last.finish_reason == "length"
    assert stats.failovers["kv_checksum"] == 1 and sum(stats.failovers.values()) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "checksum" in r.getMessage()]
    assert any("retrying with a fresh transfer" in w for w in warnings), warnings
    assert [(r.attempt, r.cursor, r.cause) for r in record.routes] == [(0, 0, None), (1, 1, "kv_checksum")]


def test_retries_exhausted_before_any_token_is_a_refusal(model):
    """Both decode workers dead but not yet noticed by the router: two placements fail, the
    retry budget (1) is spent, and the caller gets a refusal (nothing was streamed)."""

    async def run():
        cluster = await LocalCluster(_config(model, decode=2, max_retries=1, wait_for_worker_s=0.0)).start()
        try:
            for wid in ("decode-0", "decode-1"):
                cluster.workers[wid].shutdown()  # dead, and the controller has not said so
                cluster.killed.add(wid)
            with pytest.raises(NoWorkerAvailable, match="failed on 2 placements: worker_lost"):
                async for _ in cluster.router.generate(RequestSpec("x", [5] * 3, LONG)):
                    pass
            # with none left to try the next request is refused at once
            with pytest.raises(NoWorkerAvailable, match="no healthy decode-capable"):
                async for _ in cluster.router.generate(RequestSpec("y", [5] * 3, LONG)):
                    pass
            return cluster.router.stats, await cluster.store.journal_load("x")
        finally:
            await cluster.stop()

    stats, record = asyncio.run(run())
    assert stats.failovers["worker_lost"] == 2 and stats.exhausted["worker_lost"] == 1
    assert record.end.finish_reason == "abort" and "failed on 2 placements" in record.end.error


def test_new_requests_beyond_the_in_flight_bound_are_refused(model):
    async def run():
        cluster = await LocalCluster(_config(model, decode=1, max_inflight_per_worker=1)).start()
        try:
            s = Stream(cluster, "a", [5] * 4, hold_at=1)
            await s.until_held()
            with pytest.raises(WorkersBusy, match="in-flight bound"):
                async for _ in cluster.router.generate(RequestSpec("b", [6] * 4, LONG)):
                    pass
            s.release()
            await s.task
        finally:
            await cluster.stop()

    asyncio.run(run())


def test_journal_follow_and_resume_in_a_new_router(model, reference):
    """The journal holds every token the caller saw; a live request is followed from a cursor;
    after a "restart" (a new cluster on the same store) the request continues from its
    journal and a finished one is replayed as it was."""
    prompts = _prompts(2, seed=5)
    expected = reference(prompts)
    store = InMemoryStateStore(StateConfig())

    async def first_life():
        cluster = await LocalCluster(_config(model, decode=1), store=store).start()
        try:
            done = Stream(cluster, "done", prompts[1])
            await done.task
            cut = Stream(cluster, "cut", prompts[0], hold_at=7)
            await cut.until_held()
            followed = []
            async for chunk in cluster.router.follow("cut", 3):
                followed += chunk.token_ids
                cut.release()  # the first chunk held what was there (tokens 3..6); then live ones
                if len(followed) >= 8:
                    break
            cut.task.cancel()  # the process dies: nothing more is journaled (the store stays)
            await asyncio.gather(cut.task, return_exceptions=True)
            return cut.tokens, followed
        finally:
            cluster.shutdown()

    seen, followed = asyncio.run(first_life())
    assert followed == expected[0][3 : 3 + len(followed)]
    # the cancel journaled an end: make the record look as a killed process leaves it
    store._journals["cut"].end = None
    seen_in_journal = list(store._journals["cut"].tokens)
    assert seen_in_journal[: len(seen)] == seen

    async def second_life():
        cluster = await LocalCluster(_config(model, decode=1), store=store).start()
        try:
            record = await store.journal_load("cut")
            out = []
            async for chunk in cluster.router.generate(
                RequestSpec("cut-2", prompts[0], LONG), key="cut", resume=record
            ):
                out += chunk.token_ids
            return record, out, await store.journal_load("cut"), await store.journal_load("done")
        finally:
            await cluster.stop()

    record, continued, final, done = asyncio.run(second_life())
    assert list(record.token_ids) + continued == expected[0]  # nothing repeated, nothing missing
    assert final.token_ids == tuple(expected[0]) and final.end.finish_reason == "length"
    assert done.token_ids == tuple(expected[1]) and done.end.finish_reason == "length"


def test_prefill_failing_mid_transfer_retries_on_the_other_prefill_worker(model, reference):
    """The prefill worker fails while it streams a request's KV: its link to the decode
    worker breaks in the middle of the layer-wise push, which either crashes its engine loop
    (the worker is dead: worker_lost) or fails the transfer on the decode side (kv_transfer),
    depending on which thread meets the error first. Either way the request is placed again on
    the other prefill worker, nothing is duplicated, and the half-received blocks are freed."""
    prompt = _prompts(1, seed=6, lo=36, hi=36)[0]
    pushed: list[int] = []

    def die_on_the_third_chunk(chunk):
        if chunk.request_id == "victim":
            pushed.append(chunk.layer)
            if len(pushed) == 3:
                raise RuntimeError("injected death mid-transfer")
        return chunk

    async def run():
        cfg = dataclasses.replace(
            _config(model, decode=1, prefill=2), transfer=TransferConfig("loopback", timeout_s=1.0)
        )
        cluster = await LocalCluster(cfg, transport_options={"fault_hook": die_on_the_third_chunk}).start()
        try:
            cluster.router.policy.config = RouterConfig(
                short_prompt_threshold=SHORT, decode_policy="jsq", prefill_policy="round_robin"
            )
            s = Stream(cluster, "victim", prompt)
            last = await s.task
            dead = [wid for wid, w in cluster.workers.items() if w.loop.error is not None]
            cluster.killed.update(dead)  # what the controller would replace
            _assert_pools_full(cluster)
            return s, last, cluster.router.stats, dead, await cluster.store.journal_load("victim")
        finally:
            await cluster.stop()

    s, last, stats, dead, record = asyncio.run(run())
    assert s.tokens == reference([prompt])[0] and last.finish_reason == "length"
    cause = "worker_lost" if dead == ["prefill-0"] else "kv_transfer"
    assert dead in ([], ["prefill-0"]) and stats.failovers[cause] == 1 and sum(stats.failovers.values()) == 1
    assert [(r.prefill_worker, r.cause) for r in record.routes] == [("prefill-0", None), ("prefill-1", cause)]


def test_a_decode_worker_whose_kv_receiver_is_gone_is_failed_over(model, reference):
    """The prefill worker cannot open a KV link to the decode worker chosen (its receiver
    is gone: the process died and the router has not noticed). That placement fails as
    worker_lost of the decode worker, which leaves the rotation, and the request completes on
    the other one; the prefill worker holds nothing for the failed placement."""
    prompt = _prompts(1, seed=7, lo=30, hi=30)[0]

    async def run():
        cluster = await LocalCluster(_config(model, decode=2)).start()
        try:
            cluster.workers["decode-0"].receiver.close()  # jsq's tie goes to decode-0
            s = Stream(cluster, "r", prompt)
            last = await s.task
            _assert_pools_full(cluster)
            record = await cluster.store.journal_load("r")
            return s, last, cluster.router.stats, record, cluster.router.workers["decode-0"].healthy
        finally:
            await cluster.stop()

    s, last, stats, record, healthy = asyncio.run(run())
    assert s.tokens == reference([prompt])[0] and last.finish_reason == "length" and last.error is None
    assert stats.failovers["worker_lost"] == 1 and sum(stats.failovers.values()) == 1
    assert [(r.decode_worker, r.cause) for r in record.routes] == [("decode-0", None), ("decode-1", "worker_lost")]
    assert not healthy


def test_a_request_cancelled_twice_while_its_end_is_journaled_leaves_the_router(model):
    """A second cancellation landing while the journal write of a cancelled request's end is
    in progress (a slow store) must not leave the request registered as in flight."""

    async def run():
        cluster = await LocalCluster(_config(model, decode=1)).start()
        writing = asyncio.Event()

        async def slow_finish(key, end):  # the store never answers within the test
            writing.set()
            await asyncio.Event().wait()

        cluster.store.journal_finish = slow_finish
        try:
            got = asyncio.Event()

            async def consume():
                async for _ in cluster.router.generate(RequestSpec("r", _prompts(1, seed=8)[0], LONG)):
                    got.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(got.wait(), 60)
            task.cancel()  # the client goes away: the router journals the end...
            await asyncio.wait_for(writing.wait(), 60)
            task.cancel()  # ...and is cancelled again in the middle of that write
            with pytest.raises(asyncio.CancelledError):
                await task
            return dict(cluster.router.requests), dict(cluster.router.by_key)
        finally:
            await cluster.stop()

    requests, by_key = asyncio.run(run())
    assert requests == {} and by_key == {}
