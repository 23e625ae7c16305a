"""cluster.metrics.registry: request lifecycles update the right series; worker-side series pulled from
the router's stats reports stay monotonic across worker restarts; exposition endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import RouterConfig
from cluster.control.handles import DecodeHandle, PrefillHandle
from cluster.control.router import Router
from cluster.control.routing import NoWorkerAvailable, RoutingPolicy
from cluster.frontends.service import Overloaded, RequestTimeout, ServingBackend
from cluster.metrics.registry import (
    FINISH_REASONS,
    SLO,
    Metrics,
    exported_names,
    metrics_asgi_app,
    start_metrics_server,
)
from cluster.metrics.workers import Kind, MetricDef, default_pool_of, poll_loads
from engine.config import ModelConfig
from engine.request import SamplingParams
from engine.runtime.stats import TRANSFER_SECONDS_BUCKETS, CumulativeHistogram
from engine.tokenizer import Tokenizer
from engine.types import (
    AttentionOffloadReport,
    ExpertCacheReport,
    ExpertParallelReport,
    HistogramReport,
    SpeculationReport,
    StreamChunk,
    WorkerStats,
)
from tests.fakes import worker_stats


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def val(m: Metrics, name: str, **labels: str) -> float:
    v = m.sample_value(name, {"model": "m", **labels})
    assert v is not None, f"no sample {name} {labels}"
    return v


# ---------------------------------------------------------------- request lifecycle


def test_completed_request_updates_every_request_series():
    clock = Clock()
    m = Metrics("m", SLO(ttft_s=1.0, tpot_s=0.1), clock=clock)
    tr = m.track(prompt_tokens=10)
    assert val(m, "splitserve_requests_in_flight") == 1
    clock.t += 0.5
    tr.tokens(1)  # first token: TTFT 0.5
    clock.t += 0.2
    tr.tokens(2)  # two tokens in one chunk: two gaps of 0.1
    clock.t += 0.05
    tr.tokens(0)  # an empty chunk changes nothing
    clock.t += 0.05
    tr.tokens(1)  # gap 0.1
    tr.finish("length", cached_tokens=4)

    assert val(m, "splitserve_requests_total", finish_reason="length") == 1
    assert sum(val(m, "splitserve_requests_total", finish_reason=r) for r in FINISH_REASONS) == 1
    assert val(m, "splitserve_requests_in_flight") == 0
    assert val(m, "splitserve_time_to_first_token_seconds_count") == 1
    assert val(m, "splitserve_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert val(m, "splitserve_time_to_first_token_seconds_bucket", le="0.3") == 0
    assert val(m, "splitserve_time_to_first_token_seconds_bucket", le="0.5") == 1
    assert val(m, "splitserve_inter_token_latency_seconds_count") == 3
    assert val(m, "splitserve_inter_token_latency_seconds_sum") == pytest.approx(0.3)
    assert val(m, "splitserve_time_per_output_token_seconds_sum") == pytest.approx(0.1)  # (0.8 - 0.5) / 3
    assert val(m, "splitserve_e2e_request_latency_seconds_sum") == pytest.approx(0.8)
    assert val(m, "splitserve_prompt_tokens_total") == 10
    assert val(m, "splitserve_prompt_tokens_cached_total") == 4
    assert val(m, "splitserve_generation_tokens_total") == 4
    assert val(m, "splitserve_request_generation_tokens_sum") == 4
    assert val(m, "splitserve_requests_slo_met_total") == 1  # TTFT 0.5 <= 1, TPOT 0.1 <= 0.1
    assert val(m, "splitserve_slo_ttft_seconds") == 1.0


@pytest.mark.parametrize("ttft, gap, met", [(0.5, 0.1, 1), (1.5, 0.1, 0), (0.5, 0.3, 0)])
def test_goodput_counts_only_requests_meeting_both_slos(ttft, gap, met):
    clock = Clock()
    m = Metrics("m", SLO(ttft_s=1.0, tpot_s=0.2), clock=clock)
    tr = m.track(3)
    clock.t += ttft
    tr.tokens(1)
    clock.t += gap
    tr.tokens(1)
    tr.finish("stop")
    assert val(m, "splitserve_requests_slo_met_total") == met


def test_unfinished_outcomes_count_once_and_skip_latency_histograms():
    clock = Clock()
    m = Metrics("m", clock=clock)
    tr = m.track(5)
    clock.t += 0.2
    tr.tokens(1)
    tr.finish("cancelled")
    tr.finish("stop")  # ignored: a request ends once
    tr.tokens(3)  # ignored after the end
    assert val(m, "splitserve_requests_total", finish_reason="cancelled") == 1
    assert val(m, "splitserve_requests_total", finish_reason="stop") == 0
    assert val(m, "splitserve_time_to_first_token_seconds_count") == 1  # the first token did arrive
    assert val(m, "splitserve_e2e_request_latency_seconds_count") == 0
    assert val(m, "splitserve_requests_slo_met_total") == 0
    assert val(m, "splitserve_generation_tokens_total") == 1
    assert val(m, "splitserve_requests_in_flight") == 0
    with pytest.raises(ValueError, match="unknown finish reason"):
        m.track(1).finish("exploded")


def test_registries_are_independent_and_slo_is_validated():
    a, b = Metrics("m"), Metrics("m")
    a.track(1).finish("stop")
    assert val(a, "splitserve_requests_total", finish_reason="stop") == 1
    assert val(b, "splitserve_requests_total", finish_reason="stop") == 0
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=0)
    with pytest.raises(ValueError, match="_total"):
        MetricDef("splitserve_x_total", Kind.COUNTER, "declared with its suffix")
    with pytest.raises(ValueError, match="splitserve_"):
        MetricDef("x_seconds", Kind.GAUGE, "no prefix")


# ---------------------------------------------------------------- ServingBackend observer


class FakeRouter:
    """Router stand-in: ``generate`` plays a scripted list of chunks (or raises / hangs)."""

    def __init__(self, script):
        self.script = script
        self.workers: dict = {}

    async def generate(self, spec, **kw) -> AsyncIterator[StreamChunk]:
        if isinstance(self.script, BaseException):
            raise self.script
        if self.script == "hang":
            await asyncio.Event().wait()
        for chunk in self.script:
            yield chunk


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    d = tiny_checkpoint("llama")
    return Tokenizer(d), ModelConfig.from_hf_dir(d)


def backend(tiny, script, **kw) -> tuple[ServingBackend, Metrics]:
    m = Metrics("m")
    return ServingBackend(FakeRouter(script), *tiny, "m", metrics=m, **kw), m


async def drain(svc: ServingBackend, n: int | None = None) -> int:
    got = 0
    async for _ in svc.generate([5, 6, 7], SamplingParams(max_tokens=8)):
        got += 1
        if n is not None and got >= n:
            break
    return got


def test_backend_records_finish_reasons_of_every_outcome(tiny):
    done = [StreamChunk([11]), StreamChunk([12, 13]), StreamChunk([], finished=True, finish_reason="stop")]
    svc, m = backend(tiny, done)
    assert asyncio.run(drain(svc)) == 3
    assert val(m, "splitserve_requests_total", finish_reason="stop") == 1
    assert val(m, "splitserve_generation_tokens_total") == 3
    assert val(m, "splitserve_prompt_tokens_total") == 3
    assert val(m, "splitserve_e2e_request_latency_seconds_count") == 1

    svc, m = backend(tiny, done)
    asyncio.run(drain(svc, n=1))  # the client leaves after the first delta
    assert val(m, "splitserve_requests_total", finish_reason="cancelled") == 1

    svc, m = backend(tiny, NoWorkerAvailable("none"))
    with pytest.raises(NoWorkerAvailable):
        asyncio.run(drain(svc))
    assert val(m, "splitserve_requests_total", finish_reason="error") == 1

    svc, m = backend(tiny, "hang", request_timeout_s=0.05)
    with pytest.raises(RequestTimeout):
        asyncio.run(drain(svc))
    assert val(m, "splitserve_requests_total", finish_reason="timeout") == 1

    svc, m = backend(tiny, [StreamChunk([], finished=True, finish_reason="abort", error="worker died")])
    asyncio.run(drain(svc))
    assert val(m, "splitserve_requests_total", finish_reason="abort") == 1
    assert val(m, "splitserve_requests_in_flight") == 0

    svc, m = backend(tiny, done, max_queue=0)
    with pytest.raises(Overloaded):
        asyncio.run(drain(svc))
    assert val(m, "splitserve_requests_rejected_total", reason="overloaded") == 1
    assert sum(val(m, "splitserve_requests_total", finish_reason=r) for r in FINISH_REASONS) == 0


# ---------------------------------------------------------------- worker-side collector


class NoCalls:
    """An invoker for workers the collector must never call."""

    async def invoke(self, fn, *args):
        raise AssertionError("the collector must not call workers")


def no_handle(wid: str) -> PrefillHandle | DecodeHandle:
    return PrefillHandle(wid, NoCalls()) if wid.startswith("prefill") else DecodeHandle(wid, NoCalls())


def report(started_at: float, preemptions: int, transfer_s: list[float], role: str = "prefill") -> WorkerStats:
    hist = CumulativeHistogram(TRANSFER_SECONDS_BUCKETS)
    for s in transfer_s:
        hist.observe(s)
    return worker_stats(
        role=role,
        started_at=started_at,
        engine={
            "running_requests": 1,
            "pending_prompt_tokens": 40,
            "free_kv_blocks": 25,
            "total_kv_blocks": 100,
            "preemptions": preemptions,
            "prefix_cache_hits": 1,
            "prefix_cache_queries": 2,
        },
        pending_requests=3,
        transfer_bytes=1000 * len(transfer_s),
        transfer_seconds=hist.report(),
        queue_seconds=CumulativeHistogram((0.1, 1.0)).report(),
        reserve_wait_seconds=CumulativeHistogram((0.1, 1.0)).report(),
        handoff_seconds=CumulativeHistogram((0.1, 1.0)).report(),
        speculation=None,
    )


def attached(stats: dict[str, WorkerStats]) -> tuple[Metrics, Router]:
    router = Router(RoutingPolicy(RouterConfig()))
    for wid, st in stats.items():
        router.add_worker(wid, no_handle(wid), "prefill" if wid.startswith("prefill") else "decode")
        router.workers[wid].stats = st
    m = Metrics("m")
    m.attach(router, transport="shm")
    return m, router


def scrape(m: Metrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_worker_series_come_from_the_stats_reports():
    m, router = attached({"prefill-0": report(1.0, 2, [0.003, 0.2]), "decode-0": report(1.0, 0, [])})
    w = {"model": "m", "pool": "prefill", "worker": "prefill-0"}
    assert val(m, "splitserve_kv_cache_usage_ratio", pool="prefill", worker="prefill-0") == 0.75
    assert val(m, "splitserve_num_requests_waiting", pool="prefill", worker="prefill-0") == 2
    assert m.sample_value("splitserve_preemptions_total", w) == 2
    t = {**w, "transport": "shm"}
    assert m.sample_value("splitserve_kv_transfer_bytes_total", t) == 2000
    assert m.sample_value("splitserve_kv_transfer_duration_seconds_count", t) == 2
    assert m.sample_value("splitserve_kv_transfer_duration_seconds_bucket", {**t, "le": "0.005"}) == 1
    assert m.sample_value("splitserve_kv_transfer_duration_seconds_bucket", {**t, "le": "+Inf"}) == 2
    assert m.sample_value("splitserve_worker_role", {**w, "role": "prefill"}) == 1
    assert m.sample_value("splitserve_worker_role", {**w, "role": "mixed"}) == 0
    assert m.sample_value("splitserve_worker_healthy", {**w, "role": "prefill"}) == 1
    router.mark_unhealthy("decode-0")
    d = {"model": "m", "pool": "decode", "worker": "decode-0", "role": "decode"}
    assert m.sample_value("splitserve_worker_healthy", d) == 0
    assert m.sample_value("splitserve_worker_restarts_total", {**w}) == 0


def test_restart_keeps_exported_counters_and_buckets_monotonic():
    m, router = attached({"decode-0": report(1.0, 5, [0.003, 0.003, 0.2])})
    d = {"model": "m", "pool": "decode", "worker": "decode-0"}
    t = {**d, "transport": "shm"}
    assert m.sample_value("splitserve_preemptions_total", d) == 5
    # the worker is replaced: a fresh entry with no report yet, then a report counting from 0
    router.add_worker("decode-0", no_handle("decode-0"), "decode")
    assert m.sample_value("splitserve_preemptions_total", d) == 5  # totals held, not dropped
    assert m.sample_value("splitserve_kv_cache_usage_ratio", d) is None  # no gauge without a report
    router.workers["decode-0"].stats = report(2.0, 1, [0.003])
    assert m.sample_value("splitserve_preemptions_total", d) == 6
    assert m.sample_value("splitserve_worker_restarts_total", d) == 1
    assert m.sample_value("splitserve_kv_transfer_duration_seconds_count", t) == 4
    assert m.sample_value("splitserve_kv_transfer_duration_seconds_bucket", {**t, "le": "0.005"}) == 3
    assert m.sample_value("splitserve_kv_transfer_duration_seconds_sum", t) == pytest.approx(0.209)
    assert m.sample_value("splitserve_kv_transfer_bytes_total", t) == 4000
    assert m.sample_value("splitserve_worker_start_time_seconds", d) == 2.0
    # same incarnation, counters grow: no restart
    router.workers["decode-0"].stats = report(2.0, 3, [0.003])
    assert m.sample_value("splitserve_preemptions_total", d) == 8
    assert m.sample_value("splitserve_worker_restarts_total", d) == 1
    # the worker leaves the router: its counters stay (frozen), its gauges go
    router.remove_worker("decode-0")
    assert m.sample_value("splitserve_preemptions_total", d) == 8
    assert m.sample_value("splitserve_kv_cache_usage_ratio", d) is None


def test_exported_names_match_what_a_full_scrape_exposes():
    speculating = dataclasses.replace(
        report(1.0, 0, []),
        speculation=SpeculationReport(3, 2, HistogramReport((0.0, 1.0), (1, 2), 1.0, 2), None, None, 1, False),
        expert_parallel=ExpertParallelReport(
            0, 2, True, 4, 10, 6, 5, 800, 600, 0.25, cache=ExpertCacheReport(2, 7, 3, 4, 1, 5, 4096, 0.5, 0.125)
        ),
        attention=AttentionOffloadReport(2, True, (3, 1), (8, 8), 40, 9000, 100, 0.5, 2.0),
    )
    m, router = attached({"prefill-0": report(1.0, 1, [0.01]), "decode-0": speculating})
    d = {"model": "m", "pool": "decode", "worker": "decode-0"}
    # an EP pool placed by its routing log's prior (s-TS): 3 requests, 1 of them capped
    from tests.unit.cluster.test_expert_affinity import affinity

    sts = affinity()
    sts.placed, sts.capped = 3, 1
    router.policy.affinities = (sts,)
    for outcome, n in (("voted", 2), ("capped", 1)):
        assert (
            m.sample_value("splitserve_ep_sts_placements_total", {"model": "m", "pool": "ep", "outcome": outcome}) == n
        )
    assert m.sample_value("splitserve_attention_max_load_ratio", d) == 3 / 8  # the busier attention worker
    assert m.sample_value("splitserve_attention_payload_bytes_total", d) == 9000
    assert m.sample_value("splitserve_attention_tokens_total", d) == 40
    assert (
        m.sample_value("splitserve_attention_wait_seconds_total", d),
        m.sample_value("splitserve_attention_step_seconds_total", d),
    ) == (0.5, 2.0)
    assert (
        m.sample_value("splitserve_ep_local_tokens_total", d),
        m.sample_value("splitserve_ep_routed_tokens_total", d),
    ) == (6, 10)
    assert m.sample_value("splitserve_ep_dispatch_bytes_total", d) == 800
    assert [
        m.sample_value(f"splitserve_ep_cache_{n}_total", d)
        for n in ("hits", "misses", "prefetches", "prefetch_used", "evictions", "load_bytes")
    ] == [7, 3, 4, 1, 5, 4096]
    assert m.sample_value("splitserve_ep_cache_load_seconds_total", d) == 0.5
    assert m.sample_value("splitserve_ep_cache_copy_seconds_total", d) == 0.125
    assert m.sample_value("splitserve_ep_cache_hits_total", {**d, "pool": "prefill", "worker": "prefill-0"}) is None
    assert m.sample_value("splitserve_ep_dispatch_bytes_total", {**d, "pool": "prefill", "worker": "prefill-0"}) is None
    assert (
        m.sample_value("splitserve_spec_accepted_tokens_total", {"model": "m", "pool": "decode", "worker": "decode-0"})
        == 2
    )
    d = {"model": "m", "pool": "decode", "worker": "decode-0"}
    assert m.sample_value("splitserve_spec_proposer_faults_total", d) == 1
    assert m.sample_value("splitserve_spec_proposer_disabled", d) == 0
    m.track(4).finish("cancelled")
    tr = m.track(4)
    tr.tokens(2)
    tr.finish("stop")
    m.rejected("overloaded")
    names = {name for name, _ in scrape(m)}
    assert names == set(exported_names())


def test_pool_names_follow_worker_ids():
    assert default_pool_of("decode-big-3", "decode") == "decode-big"
    assert default_pool_of("solo", "mixed") == "mixed"


def test_attach_once_and_poll_interval_checked():
    m, router = attached({})
    with pytest.raises(RuntimeError, match="already"):
        m.attach(router, "shm")
    with pytest.raises(ValueError, match="interval_s"):
        asyncio.run(poll_loads(router, 0))


# ---------------------------------------------------------------- exposition


def test_http_server_and_asgi_app_serve_the_registry():
    m = Metrics("m")
    m.track(1).finish("length")
    server = start_metrics_server(m, 0, "127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    finally:
        server.close()
    assert 'splitserve_requests_total{finish_reason="length",model="m"} 1.0' in body

    app = FastAPI()
    app.add_route("/metrics", metrics_asgi_app(m))  # the way the HTTP frontend mounts it

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/metrics")

    resp = asyncio.run(get())
    assert resp.status_code == 200  # served at /metrics itself, no redirect
    assert 'splitserve_requests_total{finish_reason="length",model="m"} 1.0' in resp.text
