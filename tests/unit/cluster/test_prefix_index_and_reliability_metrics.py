"""The router's prefix index (hash -> workers) and what it feeds: the prefix policy's view,
written through to the state store and loaded from it by a restarted router; and the
reliability series the metrics registry exports from the router's counters and store."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from cluster.config import RouterConfig
from cluster.control.failover import FailureCause
from cluster.control.handles import DecodeHandle, LocalInvoker
from cluster.control.router import Router
from cluster.control.routing import RoutingPolicy
from cluster.control.state import InMemoryStateStore
from cluster.control.state.prefix_index import PrefixIndex
from cluster.metrics.registry import Metrics
from tests.fakes import worker_stats


def test_prefix_index_keeps_both_directions_and_counts_leading_matches():
    idx = PrefixIndex()
    assert idx.replace("d0", [1, 2, 3]) and idx.replace("d1", [1, 5])
    assert not idx.replace("d0", [3, 2, 1])  # the same set: no change
    assert idx.workers_holding(1) == {"d0", "d1"} and idx.workers_holding(5) == {"d1"}
    assert idx.leading_matches([1, 2, 9]) == {"d0": 2, "d1": 1}
    assert idx.leading_matches([5, 2]) == {"d1": 1} and idx.leading_matches([9, 1]) == {}  # leading blocks only
    idx.replace("d1", [2])
    assert idx.workers_holding(1) == {"d0"} and idx.workers_holding(5) == frozenset()
    idx.drop("d0")
    assert idx.workers() == ["d1"] and len(idx) == 1 and idx.hashes_of("d0") == frozenset()


class _Stats:
    """A worker stand-in whose stats() reports given prefix hashes."""

    def __init__(self, wid: str, hashes: frozenset[int]):
        self.wid, self.hashes = wid, hashes

    def stats(self):
        return worker_stats(self.wid, cached_block_hashes=self.hashes)


def _router(store) -> Router:
    return Router(RoutingPolicy(RouterConfig(decode_policy="prefix", short_prompt_threshold=1000)), store=store)


def test_prefix_index_is_fed_by_stats_written_through_and_loaded_by_a_new_router():
    store = InMemoryStateStore()

    async def first():
        r = _router(store)
        for wid, hashes in (("d0", frozenset({11, 12})), ("d1", frozenset({13}))):
            r.add_worker(wid, DecodeHandle(wid, LocalInvoker(wid, _Stats(wid, hashes))), "decode")
        await r.refresh_loads()
        return {w.worker_id: w.cached_prefix_hashes for w in r.snapshot()}, await store.prefix_load()

    view, saved = asyncio.run(first())
    assert view == saved == {"d0": frozenset({11, 12}), "d1": frozenset({13})}

    async def restarted():
        r = _router(store)
        for wid in ("d0", "d1"):  # registered, not polled yet
            r.add_worker(wid, DecodeHandle(wid, LocalInvoker(wid, _Stats(wid, frozenset()))), "decode")
        before = {w.worker_id: w.cached_prefix_hashes for w in r.snapshot()}
        await r.start()
        after = {w.worker_id: w.cached_prefix_hashes for w in r.snapshot()}
        decision = r.policy.route(4, r.snapshot(), [13])
        await r.worker_lost("d1", "killed")
        return before, after, decision, await store.prefix_load()

    before, after, decision, saved = asyncio.run(restarted())
    assert before == {"d0": frozenset(), "d1": frozenset()}
    assert after == {"d0": frozenset({11, 12}), "d1": frozenset({13})}  # routes by prefix before any poll
    assert decision.decode_worker == "d1"
    assert saved == {"d0": frozenset({11, 12})}  # a lost worker leaves the index


def _scrape(m: Metrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_reliability_series_follow_the_router_and_its_store():
    router = Router(RoutingPolicy(RouterConfig()))
    m = Metrics("m")
    m.attach(router, transport="shm")
    got = _scrape(m)
    assert got[("splitserve_request_failovers_total", frozenset({("model", "m"), ("cause", "kv_checksum")}))] == 0
    assert got[("splitserve_state_store_up", frozenset({("model", "m"), ("backend", "memory")}))] == 1
    router.stats.failover(FailureCause.KV_CHECKSUM)
    router.stats.failover(FailureCause.WORKER_LOST)
    router.stats.failover(FailureCause.WORKER_LOST)
    router.stats.gave_up(FailureCause.WORKER_LOST)
    router.stats.recovered(0.3)
    router.stats.resumed["continued"] += 1
    router.stats.waiting = 2
    got = _scrape(m)
    labels = lambda **kw: frozenset({("model", "m"), *kw.items()})  # noqa: E731
    assert got[("splitserve_request_failovers_total", labels(cause="worker_lost"))] == 2
    assert got[("splitserve_request_failovers_total", labels(cause="kv_checksum"))] == 1
    assert got[("splitserve_request_failover_exhausted_total", labels(cause="worker_lost"))] == 1
    assert got[("splitserve_failover_recovery_seconds_count", labels())] == 1
    assert got[("splitserve_failover_recovery_seconds_bucket", labels(le="0.25"))] == 0
    assert got[("splitserve_failover_recovery_seconds_bucket", labels(le="0.5"))] == 1
    assert got[("splitserve_requests_resumed_total", labels(source="continued"))] == 1
    assert got[("splitserve_failover_waiting_requests", labels())] == 2
