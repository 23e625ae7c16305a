"""Reliability series: failovers, retries given up, recovery time, resumed requests, and the
state store's health, read at scrape time from the router (``Router.stats``, a FailoverStats)
and its state store (``StateStore.health()``).

Every series exists from the first scrape (each cause and source at 0), so rates and alerts
need no ``absent()``. Counters only grow: the router's counts live as long as the serving
process, like the request-level series of registry.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cluster.control.failover import RECOVERY_SECONDS_BUCKETS, FailureCause
from cluster.control.router import Router
from cluster.metrics.workers import Kind, MetricDef

C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
M = ("model",)
CAUSES = tuple(c.value for c in FailureCause)
RESUME_SOURCES = ("live", "replayed", "continued")

# fmt: off
RELIABILITY_METRICS: tuple[MetricDef, ...] = (
    MetricDef("splitserve_request_failovers", C, f"Placements of a request that failed and were retried on another (cause: {' | '.join(CAUSES)}).", (*M, "cause")),
    MetricDef("splitserve_request_failover_exhausted", C, "Requests that ended with an explicit error after their bounded retries, by the last failure's cause.", (*M, "cause")),
    MetricDef("splitserve_failover_recovery_seconds", H, "From a placement failing to the request's next token on its new placement.", M, RECOVERY_SECONDS_BUCKETS),
    MetricDef("splitserve_failover_waiting_requests", G, "Failed-over requests waiting now for a worker to continue on (e.g. the replacement of the only decode worker).", M),
    MetricDef("splitserve_failover_waits", C, "Failed-over requests that had to wait for a worker.", M),
    MetricDef("splitserve_requests_resumed", C, "Resume calls served (source: live = still running here, replayed = finished, from the journal, continued = re-prefilled from the journal after a restart).", (*M, "source")),
    MetricDef("splitserve_state_store_up", G, "1 when the state store is reachable (the in-memory one always is), 0 while degraded (serving without durability).", (*M, "backend")),
    MetricDef("splitserve_state_store_outages", C, "Times the state store turned degraded (its backend unreachable).", (*M, "backend")),
    MetricDef("splitserve_state_store_dropped_writes", C, "State store writes dropped while degraded (journal entries, heartbeats, prefix index updates).", (*M, "backend")),
)
# fmt: on


class ReliabilityCollector(Collector):
    def __init__(self, router: Router, model: str):
        self.router = router
        self.model = model

    def _families(self) -> dict[str, Metric]:
        cls = {Kind.COUNTER: CounterMetricFamily, Kind.GAUGE: GaugeMetricFamily, Kind.HISTOGRAM: HistogramMetricFamily}
        return {d.name: cls[d.kind](d.name, d.help, labels=list(d.labels)) for d in RELIABILITY_METRICS}

    def describe(self) -> Iterator[Metric]:
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        s = self.router.stats
        m = self.model
        for cause in CAUSES:
            fams["splitserve_request_failovers"].add_metric([m, cause], s.failovers[cause])
            fams["splitserve_request_failover_exhausted"].add_metric([m, cause], s.exhausted[cause])
        rec = s.recovery_report()
        buckets = [(floatToGoString(b), c) for b, c in zip(rec.bounds, rec.counts) if not math.isinf(b)]
        buckets.append(("+Inf", rec.count))
        fams["splitserve_failover_recovery_seconds"].add_metric([m], buckets, rec.sum)
        fams["splitserve_failover_waiting_requests"].add_metric([m], s.waiting)
        fams["splitserve_failover_waits"].add_metric([m], s.waits)
        for source in RESUME_SOURCES:
            fams["splitserve_requests_resumed"].add_metric([m, source], s.resumed[source])
        h = self.router.store.health()
        fams["splitserve_state_store_up"].add_metric([m, h.backend], 1.0 if h.ok else 0.0)
        fams["splitserve_state_store_outages"].add_metric([m, h.backend], h.outages)
        fams["splitserve_state_store_dropped_writes"].add_metric([m, h.backend], h.dropped_writes)
        return iter(fams.values())
