"""Prometheus metrics of a splitserve frontend: request-level series and worker-side series.

Everything lives in one ``Metrics`` object owning its own ``CollectorRegistry`` (never the
global one, so tests and several frontends in one process don't collide). Names start with
``splitserve_``, use base units (seconds, bytes), counters end in ``_total``, and every
series carries ``model``.

- Request-level series (``REQUEST_METRICS``) are observed by the ServingBackend through a
  ``RequestTracker`` per request: ``track()`` at admission, ``tokens()`` per streamed chunk,
  ``finish()`` once at the end, whatever the end.
- Worker-side series (``metrics_collect.WORKER_METRICS``) are pulled at scrape time from the
  router's cached ``stats()`` reports once ``attach(router, transport)`` was called.
- Reliability series (``reliability.RELIABILITY_METRICS``: failovers, retries given up,
  recovery time, resumes, the state store's health) are pulled at scrape time from the same
  router after ``attach``.

To add a metric, add one ``MetricDef`` line to REQUEST_METRICS (and record it in the
tracker) or to WORKER_METRICS (with a ``source`` reading the stats() report).

Exposition: ``metrics_asgi_app(metrics)`` (an ASGI app; ``splitserve serve`` serves it on
``/metrics`` of the HTTP port and on ServeConfig.metrics_port, with the frontends' TLS and
optional API key: cluster/frontends/http_server.py MetricsEndpoint) or
``start_metrics_server(metrics, port)`` (its own plaintext, unauthenticated HTTP thread, for
tools and tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cluster.control.router import Router
from cluster.metrics.reliability import RELIABILITY_METRICS, ReliabilityCollector
from cluster.metrics.workers import WORKER_METRICS, Kind, MetricDef, WorkerCollector, default_pool_of, poll_loads

# ``_created`` series double every counter and histogram and nothing here reads them.
# (process-wide prometheus_client setting)
prometheus_client.disable_created_metrics()

# Bucket bounds in seconds, ms to minutes: LLM latencies span 4 orders of magnitude.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)  # fmt: skip
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0)  # fmt: skip
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

# How a request admitted by the ServingBackend ended (label ``finish_reason``): the worker's
# finish reasons, plus the ones only the frontend sees.
FINISH_REASONS = ("stop", "length", "abort", "timeout", "cancelled", "error")
COMPLETED = ("stop", "length")  # latency histograms and SLO counting cover these only

C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
M = ("model",)

# fmt: off
REQUEST_METRICS: tuple[MetricDef, ...] = (
    MetricDef("splitserve_requests", C, f"Admitted requests by how they ended: {' | '.join(FINISH_REASONS)}.", (*M, "finish_reason")),
    MetricDef("splitserve_requests_rejected", C, "Requests refused before admission (reason: overloaded = the frontend's max_queue, workers_busy = every worker at its in-flight bound).", (*M, "reason")),
    MetricDef("splitserve_requests_slo_met", C, "Completed requests whose TTFT and TPOT both met the SLO (goodput).", M),
    MetricDef("splitserve_requests_in_flight", G, "Requests admitted by the frontend and not finished.", M),
    MetricDef("splitserve_prompt_tokens", C, "Prompt tokens of requests whose prefill finished (first token out).", M),
    MetricDef("splitserve_prompt_tokens_cached", C, "Prompt tokens served from the prefix cache (finished requests).", M),
    MetricDef("splitserve_generation_tokens", C, "Generated tokens streamed to clients.", M),
    MetricDef("splitserve_time_to_first_token_seconds", H, "Admission to first token.", M, TTFT_BUCKETS),
    MetricDef("splitserve_inter_token_latency_seconds", H, "Gap between streamed tokens (a chunk of k tokens counts k gaps of 1/k).", M, TOKEN_LATENCY_BUCKETS),
    MetricDef("splitserve_time_per_output_token_seconds", H, "Per completed request: (last token - first token) / (tokens - 1).", M, TOKEN_LATENCY_BUCKETS),
    MetricDef("splitserve_e2e_request_latency_seconds", H, "Admission to last token, completed requests.", M, E2E_BUCKETS),
    MetricDef("splitserve_request_prompt_tokens", H, "Prompt length of completed requests.", M, TOKEN_COUNT_BUCKETS),
    MetricDef("splitserve_request_generation_tokens", H, "Output length of completed requests.", M, TOKEN_COUNT_BUCKETS),
    MetricDef("splitserve_slo_ttft_seconds", G, "Configured time-to-first-token SLO (alerts and goodput compare to it).", M),
    MetricDef("splitserve_slo_tpot_seconds", G, "Configured time-per-output-token SLO.", M),
)
# fmt: on


@dataclass(frozen=True)
class SLO:
    """Latency targets a request must meet to count as goodput (DistServe)."""

    ttft_s: float = 2.0  # time to first token
    tpot_s: float = 0.1  # time per output token after the first

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"SLO.{name} must be > 0, got {v!r}")


def all_metric_defs() -> tuple[MetricDef, ...]:
    return REQUEST_METRICS + WORKER_METRICS + RELIABILITY_METRICS


def exported_names() -> frozenset[str]:
    """Every series name a Metrics registry can expose (histograms: _bucket/_sum/_count)."""
    return frozenset(n for d in all_metric_defs() for n in d.sample_names)


class Metrics:
    """The registry and the request-level instruments of one served model."""

    def __init__(
        self,
        model: str,
        slo: SLO = SLO(),
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not model:
            raise ValueError("Metrics needs a model name")
        self.model = model
        self.slo = slo
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.collector: WorkerCollector | None = None
        self._m: dict[str, Any] = {d.name: _instrument(d, self.registry) for d in REQUEST_METRICS}
        # children bound to this model (the label every request-level series carries)
        one = {d.name: self._m[d.name].labels(model=model) for d in REQUEST_METRICS if d.labels == M}
        self.ttft = one["splitserve_time_to_first_token_seconds"]
        self.itl = one["splitserve_inter_token_latency_seconds"]
        self.tpot = one["splitserve_time_per_output_token_seconds"]
        self.e2e = one["splitserve_e2e_request_latency_seconds"]
        self.prompt_len = one["splitserve_request_prompt_tokens"]
        self.output_len = one["splitserve_request_generation_tokens"]
        self.prompt_tokens = one["splitserve_prompt_tokens"]
        self.cached_tokens = one["splitserve_prompt_tokens_cached"]
        self.generation_tokens = one["splitserve_generation_tokens"]
        self.in_flight = one["splitserve_requests_in_flight"]
        self.slo_met = one["splitserve_requests_slo_met"]
        one["splitserve_slo_ttft_seconds"].set(slo.ttft_s)
        one["splitserve_slo_tpot_seconds"].set(slo.tpot_s)
        self._finished = {r: self._m["splitserve_requests"].labels(model, r) for r in FINISH_REASONS}

    # ------------------------------------------------------------ request-level
    def track(self, prompt_tokens: int) -> RequestTracker:
        """A request was admitted now; observe the rest of its life on the returned tracker."""
        return RequestTracker(self, prompt_tokens, self.clock())

    def rejected(self, reason: str) -> None:
        self._m["splitserve_requests_rejected"].labels(self.model, reason).inc()

    # ------------------------------------------------------------ worker-side
    def attach(
        self,
        router: Router,
        transport: str,
        pool_of: Callable[[str, str], str] = default_pool_of,
    ) -> WorkerCollector:
        """Export the worker-side series of ``router``'s workers (``transport`` labels the
        KV transfer series: ServeConfig.transfer.kind). Once per Metrics."""
        if self.collector is not None:
            raise RuntimeError("Metrics.attach() was already called")
        self.collector = WorkerCollector(router, self.model, transport, pool_of)
        self.registry.register(self.collector)
        self.registry.register(ReliabilityCollector(router, self.model))
        return self.collector

    # ------------------------------------------------------------ exposition
    def render(self) -> bytes:
        """The text exposition format (what a scrape returns)."""
        return prometheus_client.generate_latest(self.registry)

    def sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Current value of one sample (tests, the CLI); None when absent."""
        return self.registry.get_sample_value(name, labels or {})


class RequestTracker:
    """One admitted request's timeline on the frontend's monotonic clock.

    Lifecycle: created by ``Metrics.track`` -> ``tokens(n)`` per streamed chunk (n may be 0)
    -> ``finish(reason)`` exactly once (later calls are ignored).
    """

    def __init__(self, metrics: Metrics, prompt_tokens: int, now: float):
        self.m = metrics
        self.prompt_tokens = prompt_tokens
        self.arrival = now
        self.first: float | None = None  # time of the first token
        self.last: float | None = None  # time of the latest token
        self.num_tokens = 0
        self.finished = False
        metrics.in_flight.inc()

    def tokens(self, n: int, now: float | None = None) -> None:
        if n <= 0 or self.finished:
            return
        m = self.m
        now = m.clock() if now is None else now
        if self.first is None:
            self.first = now
            m.ttft.observe(now - self.arrival)
            m.prompt_tokens.inc(self.prompt_tokens)
            gaps, gap = n - 1, 0.0  # tokens that arrived together with the first one
        else:
            gaps, gap = n, (now - self.last) / n
        for _ in range(gaps):
            m.itl.observe(gap)
        self.last = now
        self.num_tokens += n
        m.generation_tokens.inc(n)

    def finish(self, reason: str, cached_tokens: int = 0, now: float | None = None) -> None:
        if self.finished:
            return
        if reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {reason!r}; known: {FINISH_REASONS}")
        self.finished = True
        m = self.m
        now = m.clock() if now is None else now
        m.in_flight.dec()
        m._finished[reason].inc()
        if reason not in COMPLETED:
            return
        m.cached_tokens.inc(max(0, cached_tokens))
        m.e2e.observe(now - self.arrival)
        m.prompt_len.observe(self.prompt_tokens)
        m.output_len.observe(self.num_tokens)
        ttft = (self.first - self.arrival) if self.first is not None else now - self.arrival
        tpot = None
        if self.num_tokens > 1 and self.first is not None and self.last is not None:
            tpot = (self.last - self.first) / (self.num_tokens - 1)
            m.tpot.observe(tpot)
        if ttft <= m.slo.ttft_s and (tpot is None or tpot <= m.slo.tpot_s):
            m.slo_met.inc()


def _instrument(d: MetricDef, registry: CollectorRegistry) -> Any:
    if d.kind is Kind.COUNTER:
        return Counter(d.name, d.help, d.labels, registry=registry)
    if d.kind is Kind.GAUGE:
        return Gauge(d.name, d.help, d.labels, registry=registry)
    return Histogram(d.name, d.help, d.labels, registry=registry, buckets=d.buckets)


# ---------------------------------------------------------------- exposition endpoints
class MetricsServer:
    """The HTTP thread of ``start_metrics_server``; ``port`` is the bound port."""

    def __init__(self, server: Any, thread: Any):
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_metrics_server(metrics: Metrics, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``metrics`` at ``http://addr:port/metrics`` (any path works) from a daemon
    thread. ``port=0`` picks a free port (read it from ``.port``)."""
    server, thread = prometheus_client.start_http_server(port, addr, registry=metrics.registry)
    return MetricsServer(server, thread)


class _ASGIExposition:
    """An ASGI app object (not a function), so Starlette routes it as an app, not an endpoint."""

    def __init__(self, registry: CollectorRegistry):
        self._app = prometheus_client.make_asgi_app(registry=registry)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def metrics_asgi_app(metrics: Metrics) -> Any:
    """ASGI app answering with the exposition. In FastAPI:
    ``app.add_route("/metrics", metrics_asgi_app(metrics))`` serves exactly ``/metrics``;
    ``app.mount("/metrics", ...)`` also works but answers ``/metrics`` with a redirect to
    ``/metrics/`` (Prometheus follows it)."""
    return _ASGIExposition(metrics.registry)


__all__ = [
    "COMPLETED",
    "FINISH_REASONS",
    "RELIABILITY_METRICS",
    "REQUEST_METRICS",
    "SLO",
    "WORKER_METRICS",
    "Metrics",
    "MetricsServer",
    "RequestTracker",
    "all_metric_defs",
    "exported_names",
    "metrics_asgi_app",
    "poll_loads",
    "start_metrics_server",
]
