"""The state store's two backends behave the same (journal, registry, prefix index), and the
Redis one survives its server going away: degraded, writes dropped and counted, one warning,
reconnection by itself, the reconnect hooks run. Redis is a real redis-server on a free port."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cluster.config import StateConfig
from cluster.control.state import (
    InMemoryStateStore,
    JournalEnd,
    JournalSpec,
    RouteRecord,
    StoreUnavailable,
    WorkerRegistration,
    make_state_store,
)
from cluster.control.state.redis_store import RedisStateStore, StoreConfigError
from cluster.control.state.store import assemble_tokens
from engine.request import SamplingParams
from tests.redis_server import RedisServer

PARAMS = SamplingParams(max_tokens=9, temperature=0.0, stop=("x y",), stop_token_ids=(3,), seed=5, logprobs=2)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.close()


def _spec(key: str = "k1", prompt=(5, 6, 7)) -> JournalSpec:
    return JournalSpec(key, f"{key}-run", tuple(prompt), PARAMS, "grpc", 1234.5)


@pytest.fixture(params=["memory", "redis"])
def store_config(request, redis_server):
    if request.param == "memory":
        return StateConfig(heartbeat_ttl_s=1.0)
    # a fresh key prefix per test: one server, no cross-test leftovers
    return StateConfig(redis_url=redis_server.url, key_prefix=f"t{time.monotonic_ns()}", heartbeat_ttl_s=1.0)


def _run(coro):
    return asyncio.run(coro)


async def _started(config: StateConfig):
    store = make_state_store(config)
    await store.start()
    return store


def test_journal_round_trip(store_config):
    async def run():
        store = await _started(store_config)
        try:
            assert await store.journal_load("k1") is None
            await store.journal_start(_spec())
            await store.journal_route("k1", RouteRecord(0, "prefill-0", "decode-0", "split", 0, None))
            await store.journal_tokens("k1", 0, [11])
            await store.journal_tokens("k1", 1, [12, 13])
            await store.journal_tokens("k1", 1, [12, 13, 14])  # a rewrite that extends: harmless
            mid = await store.journal_load("k1")
            unfinished = await store.journal_unfinished()
            assert await store.journal_in_flight("k1") and not await store.journal_in_flight("nope")
            await store.journal_route("k1", RouteRecord(1, None, "decode-1", "short_prompt", 4, "worker_lost"))
            await store.journal_tokens("k1", 4, [15])
            await store.journal_finish("k1", JournalEnd("length", None, 2))
            done = await store.journal_load("k1")
            assert not await store.journal_in_flight("k1")
            return mid, unfinished, done, await store.journal_unfinished()
        finally:
            await store.close()

    mid, unfinished, done, after = _run(run())
    assert mid.spec == _spec() and mid.token_ids == (11, 12, 13, 14) and not mid.finished and mid.complete
    assert mid.spec.params == PARAMS  # stop strings, stop ids, seed, logprobs survive the round trip
    assert unfinished == ["k1"] and after == []
    assert done.token_ids == (11, 12, 13, 14, 15)
    assert [(r.attempt, r.decode_worker, r.cursor, r.cause) for r in done.routes] == [
        (0, "decode-0", 0, None),
        (1, "decode-1", 4, "worker_lost"),
    ]
    assert done.end == JournalEnd("length", None, 2) and done.finished


def test_journal_start_replaces_an_earlier_record_under_the_key(store_config):
    async def run():
        store = await _started(store_config)
        try:
            await store.journal_start(_spec(prompt=(1,)))
            await store.journal_tokens("k1", 0, [9, 9])
            await store.journal_finish("k1", JournalEnd("stop", None, 0))
            await store.journal_start(_spec(prompt=(2, 3)))
            return await store.journal_load("k1"), await store.journal_unfinished()
        finally:
            await store.close()

    rec, unfinished = _run(run())
    assert rec.spec.prompt_token_ids == (2, 3) and rec.token_ids == () and rec.end is None
    assert unfinished == ["k1"]


def test_registry_heartbeats_expire(store_config):
    def reg(wid: str) -> WorkerRegistration:
        return WorkerRegistration(wid, "decode", "decode", "/tmp/sock", "node1", 100.0, time.time())

    async def run():
        store = await _started(store_config)
        try:
            await store.heartbeat([reg("decode-0"), reg("decode-1")])
            both = sorted(w.worker_id for w in await store.live_workers())
            await store.deregister("decode-1")
            one = [w.worker_id for w in await store.live_workers()]
            deadline = time.monotonic() + 5
            while await store.live_workers():  # decode-0's heartbeat expires (1 s TTL)
                assert time.monotonic() < deadline, "heartbeat entry never expired"
                await asyncio.sleep(0.1)  # poll interval
            return both, one
        finally:
            await store.close()

    both, one = _run(run())
    assert both == ["decode-0", "decode-1"] and one == ["decode-0"]


def test_prefix_index_round_trip(store_config):
    async def run():
        store = await _started(store_config)
        try:
            await store.prefix_replace("p0", frozenset({1, 2, -3}))
            await store.prefix_replace("d0", frozenset({2}))
            await store.prefix_replace("p0", frozenset({2, 4}))  # a diff: -1, -(-3), +4
            first = await store.prefix_load()
            await store.prefix_drop("d0")
            return first, await store.prefix_load()
        finally:
            await store.close()

    first, second = _run(run())
    assert first == {"p0": frozenset({2, 4}), "d0": frozenset({2})}
    assert second == {"p0": frozenset({2, 4})}


def test_redis_prefix_index_survives_a_new_store(redis_server):
    cfg = StateConfig(redis_url=redis_server.url, key_prefix=f"t{time.monotonic_ns()}")

    async def run():
        a = await _started(cfg)
        await a.prefix_replace("p0", frozenset({7, 8}))
        await a.journal_start(_spec("kept"))
        await a.journal_tokens("kept", 0, [1, 2])
        await a.close()
        b = await _started(cfg)  # a restarted router
        try:
            return await b.prefix_load(), await b.journal_load("kept"), await b.journal_unfinished()
        finally:
            await b.close()

    index, rec, unfinished = _run(run())
    assert index == {"p0": frozenset({7, 8})}
    assert rec.token_ids == (1, 2) and unfinished == ["kept"]


def test_memory_journal_ttl_and_cap():
    now = [0.0]
    store = InMemoryStateStore(StateConfig(journal_ttl_s=10.0, memory_max_records=2), clock=lambda: now[0])

    async def run():
        await store.journal_start(_spec("a"))
        await store.journal_finish("a", JournalEnd("stop", None, 0))
        await store.journal_start(_spec("b"))  # in flight: never dropped by the cap
        await store.journal_start(_spec("c"))  # 3 records > cap 2: the oldest finished one goes
        kept = [k for k in "abc" if await store.journal_load(k) is not None]
        now[0] = 9.0
        await store.journal_tokens("b", 0, [1])  # refreshes b's TTL
        now[0] = 15.0
        return kept, [k for k in "abc" if await store.journal_load(k) is not None]

    kept, later = _run(run())
    assert kept == ["b", "c"]
    assert later == ["b"]  # c expired 10 s after its last write; b was written at 9


def test_redis_journal_is_trimmed_at_its_cap_and_says_so(redis_server):
    cfg = StateConfig(redis_url=redis_server.url, key_prefix=f"t{time.monotonic_ns()}", journal_max_entries=16)

    async def run():
        store = await _started(cfg)
        try:
            await store.journal_start(_spec())
            for i in range(400):  # ~ trimming keeps at least 16 entries, drops whole nodes
                await store.journal_tokens("k1", i, [i])
            return await store.journal_load("k1")
        finally:
            await store.close()

    rec = _run(run())
    assert not rec.complete and rec.token_ids == ()


def test_assemble_tokens_refuses_disagreeing_pieces():
    assert assemble_tokens([(0, [1, 2]), (1, [2, 3])]) == ((1, 2, 3), True)
    assert assemble_tokens([(0, [1]), (2, [3])]) == ((1,), False)
    with pytest.raises(ValueError, match="disagree at cursor 1"):
        assemble_tokens([(0, [1, 2]), (1, [5])])


def test_redis_outage_degrades_drops_writes_and_reconnects(caplog):
    server = RedisServer()
    cfg = StateConfig(redis_url=server.url, key_prefix="outage", op_timeout_s=0.3, reconnect_interval_s=0.1)
    reconnects = []

    async def run():
        store = RedisStateStore(cfg)
        store.on_reconnect(lambda: _record(reconnects))
        await store.start()
        try:
            await store.journal_start(_spec())
            assert store.health().ok and store.health().status == "ok"
            server.stop()
            t0 = time.monotonic()
            for i in range(5):  # the first write finds Redis gone; the rest never touch the network
                await store.journal_tokens("k1", i, [i])
            elapsed = time.monotonic() - t0
            degraded = store.health()
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await store.journal_load("k1")
            server.start()
            deadline = time.monotonic() + 10
            while not store.health().ok:
                assert time.monotonic() < deadline, "never reconnected"
                await asyncio.sleep(0.05)  # poll interval
            await store.journal_tokens("k1", 0, [0])  # writes flow again
            return degraded, elapsed, store.health(), await store.journal_load("k1")
        finally:
            await store.close()
            server.close()

    with caplog.at_level(logging.WARNING, logger="cluster.control.state.redis_store"):
        degraded, elapsed, healthy, rec = _run(run())
    assert not degraded.ok and degraded.status == "degraded" and degraded.outages == 1
    assert degraded.dropped_writes == 5  # every write of the outage, each counted
    assert elapsed < 2.0, f"writes during the outage took {elapsed:.2f}s"  # at most one op_timeout
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "degraded" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "WITHOUT durability" in warnings[0].getMessage()
    assert healthy.ok and healthy.outages == 1 and reconnects == [1]
    # the restarted server lost everything (no persistence): the journal starts over from what
    # was written after the reconnection (the router's reconnect hook rewrites live requests)
    assert rec is None


async def _record(calls: list) -> None:
    calls.append(1)


def test_redis_start_with_server_down_is_degraded_not_fatal():
    cfg = StateConfig(redis_url="redis://127.0.0.1:1/0", op_timeout_s=0.2, reconnect_interval_s=60)

    async def run():
        store = RedisStateStore(cfg)
        await store.start()
        try:
            await store.journal_start(_spec())  # dropped, never raises
            return store.health()
        finally:
            await store.close()

    health = _run(run())
    assert not health.ok and health.outages == 1 and health.dropped_writes == 1
    assert "redis://127.0.0.1:1/0 unreachable" in health.detail


def test_redis_wrong_password_is_a_config_error():
    server = RedisServer(password="right-one")
    try:
        cfg = StateConfig(redis_url=server.url)

        async def run(password):
            store = RedisStateStore(cfg, password)
            await store.start()
            await store.close()

        with pytest.raises(StoreConfigError, match="refused the password|WRONGPASS|invalid"):
            _run(run("wrong-one"))
        with pytest.raises(StoreConfigError, match="requires a password: set state.password_file"):
            _run(run(None))
        _run(run("right-one"))  # the right one works
    finally:
        server.close()


def test_password_from_file_env_or_url(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert StateConfig(redis_url="redis://h:1/0", password_file=str(pw)).password({}) == "s3cret"
    assert StateConfig(redis_url="redis://h:1/0").password({"SPLITSERVE_REDIS_PASSWORD": "e"}) == "e"
    assert StateConfig(redis_url="redis://:u@h:1/0").password({}) is None  # the URL's own is used as is
    with pytest.raises(ValueError, match="password_file: is set and so is"):
        StateConfig(redis_url="redis://h:1/0", password_file=str(pw)).password({"SPLITSERVE_REDIS_PASSWORD": "e"})
    with pytest.raises(ValueError, match="holds a password and so does"):
        StateConfig(redis_url="redis://:u@h:1/0").password({"SPLITSERVE_REDIS_PASSWORD": "e"})
    with pytest.raises(ValueError, match="password_file: is set but redis_url is not"):
        StateConfig(password_file=str(pw))


def test_journal_rewrite_of_finished_and_live_records_round_trips(store_config):
    """What the router writes after an outage: a whole record in one write. A finished one
    loads finished and leaves the in-flight set (and, on Redis, the TTL bookkeeping)."""
    from cluster.control.state import JournalRecord

    async def run():
        store = await _started(store_config)
        try:
            route = RouteRecord(0, "prefill-0", "decode-0", "split", 0, None)
            end = JournalEnd("length", "finished", 0)
            await store.journal_rewrite(JournalRecord(_spec("done"), token_ids=(11, 12), routes=(route,), end=end))
            await store.journal_rewrite(JournalRecord(_spec("live"), token_ids=(21,), routes=(route,), end=None))
            done, live = await store.journal_load("done"), await store.journal_load("live")
            inflight = await store.journal_in_flight("done"), await store.journal_in_flight("live")
            refreshed = dict(store._refreshed) if isinstance(store, RedisStateStore) else None
            return done, live, inflight, refreshed
        finally:
            await store.close()

    done, live, inflight, refreshed = _run(run())
    assert (list(done.token_ids), done.end.finish_reason) == ([11, 12], "length")
    assert (list(live.token_ids), live.end) == ([21], None)
    assert inflight == (False, True)
    if refreshed is not None:  # Redis: only the live journal is kept for TTL refreshes
        assert set(refreshed) == {"live"}
