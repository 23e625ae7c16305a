"""Worker-side metrics, pulled from the router's cached ``stats()`` reports at scrape time.

No worker opens a port. ``Router.refresh_loads()`` (the controller's health watcher, or
``poll_loads`` below for a LocalCluster) keeps ``router.workers[wid].stats`` fresh, and
``WorkerCollector.collect()`` turns those ``WorkerStats`` into Prometheus families each time
the registry is scraped. Every worker-side series is declared once, in ``WORKER_METRICS``:
a ``MetricDef`` whose ``source`` reads its value from one report (None: the field does not
apply to the worker's role, e.g. bytes sent by a decode worker, and the series is omitted).

Restarts. A restarted worker reports its counters from 0 again and a new ``started_at``.
Per worker id the collector keeps ``base`` (the final values of its earlier incarnations)
and ``last`` (the current incarnation's values) and exports ``base + last``, so every
exported ``_total`` counter and histogram bucket only grows:
    new started_at
        -> base += last; last = {}; restarts += 1
What a dead incarnation counted after its last poll is lost (at most one poll interval),
and two restarts between polls count as one. Counters of a worker that left the router
keep being exported (frozen) so their rates fall to 0 instead of the series vanishing;
its gauges disappear.

Thread safety: collect() runs on the metrics server's threads while the router's event loop
replaces ``entry.stats`` (frozen dataclasses); the collector only reads them and guards its
own state with a lock.
"""

from __future__ import annotations

import asyncio
import enum
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cluster.config import ROLES
from cluster.control.expert_affinity import ExpertAffinity
from cluster.control.router import Router
from engine.types import ExpertCacheReport, HistogramReport, WorkerStats


class Kind(str, enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricDef:
    """One Prometheus metric. ``name`` is the full name; a counter's omits ``_total``."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms observed in this process (request metrics)
    # worker metrics: the value in one stats() report (a number, or a HistogramReport); the
    # source returns None where the field does not apply to the worker's role. None (no
    # source) for the few series computed from router state (roles, health, restarts).
    source: Callable[[WorkerStats], float | HistogramReport | None] | None = None

    def __post_init__(self) -> None:
        if not self.name.startswith("splitserve_"):
            raise ValueError(f"metric {self.name!r}: names start with 'splitserve_'")
        if self.kind is Kind.COUNTER and self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r}: declare it without '_total' (added on export)")
        if self.kind is Kind.HISTOGRAM and self.source is None and not self.buckets:
            raise ValueError(f"histogram {self.name!r} needs buckets")

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The series names this metric exposes (what PromQL can select)."""
        if self.kind is Kind.COUNTER:
            return (f"{self.name}_total",)
        if self.kind is Kind.HISTOGRAM:
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def _usage(s: WorkerStats) -> float:
    return 1.0 - s.engine.free_kv_blocks / s.engine.total_kv_blocks


def _waiting(s: WorkerStats) -> int:
    return max(0, s.pending_requests - s.engine.running_requests)


def _ep_cache(s: WorkerStats) -> ExpertCacheReport | None:
    """An EP worker's ExpertFlow fast-tier report (None: not EP, or no expert_cache_slots)."""
    return s.expert_parallel.cache if s.expert_parallel else None


WORKER = ("model", "pool", "worker")
TRANSFER = (*WORKER, "transport")
C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM

# fmt: off
WORKER_METRICS: tuple[MetricDef, ...] = (
    MetricDef("splitserve_kv_cache_usage_ratio", G, "Fraction of the worker's KV blocks in use (0..1).", WORKER, source=_usage),
    MetricDef("splitserve_kv_cache_free_blocks", G, "Free KV blocks (including evictable prefix-cached ones).", WORKER, source=lambda s: s.engine.free_kv_blocks),
    MetricDef("splitserve_kv_cache_total_blocks", G, "KV blocks of the worker's cache.", WORKER, source=lambda s: s.engine.total_kv_blocks),
    MetricDef("splitserve_num_requests_running", G, "Requests in the worker's running batch.", WORKER, source=lambda s: s.engine.running_requests),
    MetricDef("splitserve_num_requests_waiting", G, "Requests queued on the worker (waiting to be scheduled or for their KV).", WORKER, source=_waiting),
    MetricDef("splitserve_pending_prompt_tokens", G, "Prompt tokens queued or partially prefilled on the worker.", WORKER, source=lambda s: s.engine.pending_prompt_tokens),
    MetricDef("splitserve_kv_transfers_in_flight", G, "KV transfers the worker is sending or receiving.", TRANSFER, source=lambda s: s.transfers_in_flight),
    MetricDef("splitserve_prefix_cache_hits", C, "KV blocks found in the prefix cache.", WORKER, source=lambda s: s.engine.prefix_cache_hits),
    MetricDef("splitserve_prefix_cache_queries", C, "KV blocks looked up in the prefix cache.", WORKER, source=lambda s: s.engine.prefix_cache_queries),
    MetricDef("splitserve_preemptions", C, "Requests preempted (recomputed) for lack of KV blocks.", WORKER, source=lambda s: s.engine.preemptions),
    MetricDef("splitserve_kv_transfer_failures", C, "KV transfers that failed or timed out (counted by the side that saw it).", TRANSFER, source=lambda s: s.transfer_failures),
    MetricDef("splitserve_kv_transfer_bytes", C, "KV payload bytes of transfers that completed (sender side).", TRANSFER, source=lambda s: s.transfer_bytes),
    MetricDef("splitserve_kv_transfer_duration_seconds", H, "KV transfer time, first chunk queued to sender DONE (overlaps prefill when layer-wise).", TRANSFER, source=lambda s: s.transfer_seconds),
    MetricDef("splitserve_prefill_queue_time_seconds", H, "Time a request waited to be prefilled (on a prefill worker, or on a decode/mixed worker prefilling it locally) before its first scheduling.", WORKER, source=lambda s: s.queue_seconds),
    MetricDef("splitserve_kv_reserve_wait_seconds", H, "Time a disaggregated request waited on its decode worker for KV blocks to receive into.", WORKER, source=lambda s: s.reserve_wait_seconds),
    MetricDef("splitserve_kv_handoff_seconds", H, "KV hand-off of a disaggregated request: from the end of its prefill to the start of its first decode step on the decode worker.", WORKER, source=lambda s: s.handoff_seconds),
    MetricDef("splitserve_spec_draft_tokens", C, "Draft tokens a speculating worker verified with the target model.", WORKER, source=lambda s: s.speculation.proposed_tokens if s.speculation else None),
    MetricDef("splitserve_spec_accepted_tokens", C, "Draft tokens the target model accepted (emitted).", WORKER, source=lambda s: s.speculation.accepted_tokens if s.speculation else None),
    MetricDef("splitserve_spec_chosen_k", H, "Speculation length the policy chose, per request and step (0: no speculation).", WORKER, source=lambda s: s.speculation.chosen_k if s.speculation else None),
    MetricDef("splitserve_spec_proposer_faults", C, "Proposer (n-gram or draft model) faults of a speculating worker; each one's step ran without speculation.", WORKER, source=lambda s: s.speculation.proposer_faults if s.speculation else None),
    MetricDef("splitserve_spec_proposer_disabled", G, "1 when a speculating worker turned its proposer off for its life after repeated faults.", WORKER, source=lambda s: float(s.speculation.proposer_disabled) if s.speculation else None),
    MetricDef("splitserve_ep_routed_tokens", C, "Tokens an expert-parallel worker routed through its MoE layers (summed over layers).", WORKER, source=lambda s: s.expert_parallel.tokens if s.expert_parallel else None),
    MetricDef("splitserve_ep_local_tokens", C, "Of those, tokens whose top-k experts all sat on the worker itself (local fraction = local / routed).", WORKER, source=lambda s: s.expert_parallel.local_tokens if s.expert_parallel else None),
    MetricDef("splitserve_ep_dispatch_bytes", C, "Bytes an expert-parallel worker sent to other ranks in MoE dispatch (hidden, weights, ids).", WORKER, source=lambda s: s.expert_parallel.dispatch_bytes if s.expert_parallel else None),
    MetricDef("splitserve_ep_combine_bytes", C, "Bytes an expert-parallel worker sent back to other ranks in MoE combine (partial sums).", WORKER, source=lambda s: s.expert_parallel.combine_bytes if s.expert_parallel else None),
    MetricDef("splitserve_ep_comm_seconds", C, "Wall time an expert-parallel worker spent in its group's collectives (headers, all-to-alls).", WORKER, source=lambda s: s.expert_parallel.comm_seconds if s.expert_parallel else None),
    MetricDef("splitserve_ep_cache_hits", C, "Expert accesses of an EP worker with expert_cache_slots that found the expert in its fast tier (hit ratio = hits / (hits + misses)).", WORKER, source=lambda s: c.hits if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_misses", C, "Expert accesses that loaded the expert on demand (the forward waited for the load).", WORKER, source=lambda s: c.misses if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_prefetches", C, "Experts loaded into the fast tier ahead of need by the path predictor.", WORKER, source=lambda s: c.prefetches if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_prefetch_used", C, "Of those, prefetched experts hit before eviction (prefetch accuracy = used / prefetches).", WORKER, source=lambda s: c.prefetch_used if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_evictions", C, "Experts evicted from an EP worker's fast tier.", WORKER, source=lambda s: c.evictions if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_load_bytes", C, "Expert weight bytes copied from the slow tier into the fast tier.", WORKER, source=lambda s: c.load_bytes if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_load_seconds", C, "Those loads' time over the MODELLED slow-tier link (bytes / bandwidth), not measured.", WORKER, source=lambda s: c.load_seconds if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_ep_cache_copy_seconds", C, "Measured wall time of the fast-tier copies themselves (host memory on CPU).", WORKER, source=lambda s: c.copy_seconds if (c := _ep_cache(s)) else None),
    MetricDef("splitserve_attention_payload_bytes", C, "Attention tensors a model worker exchanged with its attention workers (q, k, v out; outputs back).", WORKER, source=lambda s: s.attention.payload_bytes if s.attention else None),
    MetricDef("splitserve_attention_tokens", C, "Query rows a model worker sent to its attention workers, summed over layers (bytes per token and layer = payload / tokens).", WORKER, source=lambda s: s.attention.tokens if s.attention else None),
    MetricDef("splitserve_attention_wait_seconds", C, "Time a model worker blocked waiting for attention outputs (not hidden behind its dense compute).", WORKER, source=lambda s: s.attention.wait_seconds if s.attention else None),
    MetricDef("splitserve_attention_step_seconds", C, "Wall time of a model worker's engine steps (overlap ratio = 1 - wait / step).", WORKER, source=lambda s: s.attention.step_seconds if s.attention else None),
    MetricDef("splitserve_attention_max_load_ratio", G, "The busiest attention worker's fraction of KV blocks in use (0..1), as the model worker accounts them.", WORKER, source=lambda s: s.attention.max_load if s.attention else None),
    MetricDef("splitserve_worker_start_time_seconds", G, "Unix time the worker (this incarnation) started.", WORKER, source=lambda s: s.started_at),
    # computed from router state, not from a stats() field (see WorkerCollector.collect)
    MetricDef("splitserve_worker_role", G, "1 for the worker's current role (a promoted decode worker is 'mixed'), 0 for the others.", (*WORKER, "role")),
    MetricDef("splitserve_worker_healthy", G, "1 if the router considers the worker healthy; role is its current role.", (*WORKER, "role")),
    MetricDef("splitserve_worker_restarts", C, "Worker restarts seen (a new incarnation reporting), per worker id.", WORKER),
    MetricDef("splitserve_role_switches", C, "Splitwise role switches (decode <-> mixed) made by the routing policy.", ("model",)),
    MetricDef("splitserve_ep_sts_placements", C, "Requests the router placed on an EP pool by its routing log's token prior (s-TS); outcome 'capped': not on the most voted member, which was at 1.5x its fair share.", ("model", "pool", "outcome")),
)
# fmt: on


@dataclass
class _WorkerState:
    pool: str
    incarnation: float | None = None  # started_at of the incarnation whose values are in ``last``
    base: dict[str, float] = field(default_factory=dict)  # finished incarnations' final values
    last: dict[str, float] = field(default_factory=dict)  # current incarnation's values
    restarts: int = 0
    hist_bounds: dict[str, list[float]] = field(default_factory=dict)  # metric -> last reported bounds

    def total(self, key: str) -> float:
        return self.base.get(key, 0.0) + self.last.get(key, 0.0)


def _flatten(d: MetricDef, value: float | HistogramReport) -> dict[str, float]:
    """Monotonic values of one metric in one report, keyed for offset bookkeeping."""
    if d.kind is Kind.COUNTER:
        return {d.name: float(value)}
    out = {f"{d.name}|le={b!r}": float(c) for b, c in zip(value.bounds, value.counts)}
    out[f"{d.name}|sum"] = float(value.sum)
    out[f"{d.name}|count"] = float(value.count)
    return out


def default_pool_of(worker_id: str, role: str) -> str:
    """Worker ids are ``<pool name>-<index>`` (LocalCluster, Controller); else the role."""
    head, sep, tail = worker_id.rpartition("-")
    return head if sep and tail.isdigit() else role


class WorkerCollector(Collector):
    """Exports WORKER_METRICS for every worker of ``router`` (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        model: str,
        transport: str,
        pool_of: Callable[[str, str], str] = default_pool_of,
    ):
        self.router = router
        self.model = model
        self.transport = transport
        self.pool_of = pool_of
        self._lock = threading.Lock()
        self._workers: dict[str, _WorkerState] = {}
        self._monotonic = [d for d in WORKER_METRICS if d.source is not None and d.kind is not Kind.GAUGE]
        self._gauges = [d for d in WORKER_METRICS if d.source is not None and d.kind is Kind.GAUGE]
        self._defs = {d.name: d for d in WORKER_METRICS}

    def describe(self) -> Iterator[Metric]:
        return iter(self._families().values())

    def collect(self) -> Iterator[Metric]:
        entries = list(self.router.workers.items())
        roles = self.router.policy.roles()
        fams = self._families()
        with self._lock:
            for wid, entry in entries:
                self._ingest(wid, entry.role, entry.stats)
            live = {wid: entry for wid, entry in entries}
            for wid, st in self._workers.items():
                base = {"model": self.model, "pool": st.pool, "worker": wid, "transport": self.transport}
                self._add_monotonic(fams, st, base)
                fams["splitserve_worker_restarts"].add_metric([self.model, st.pool, wid], st.restarts)
                entry = live.get(wid)
                if entry is None:
                    continue
                for d in self._gauges:
                    v = d.source(entry.stats) if entry.stats is not None else None
                    if v is not None:
                        fams[d.name].add_metric([base[k] for k in d.labels], float(v))
                current = roles.get(wid, entry.role)
                for r in ROLES:
                    fams["splitserve_worker_role"].add_metric([self.model, st.pool, wid, r], float(r == current))
                fams["splitserve_worker_healthy"].add_metric(
                    [self.model, st.pool, wid, current], float(bool(entry.healthy))
                )
        fams["splitserve_role_switches"].add_metric([self.model], self.router.policy.num_role_switches)
        for a in self.router.policy.affinities:
            if isinstance(a, ExpertAffinity):
                fams["splitserve_ep_sts_placements"].add_metric([self.model, a.pool, "voted"], a.placed - a.capped)
                fams["splitserve_ep_sts_placements"].add_metric([self.model, a.pool, "capped"], a.capped)
        return iter(fams.values())

    def restarts(self, worker_id: str) -> int:
        with self._lock:
            return self._workers[worker_id].restarts

    # ------------------------------------------------------------------ internals
    def _families(self) -> dict[str, Metric]:
        cls = {Kind.COUNTER: CounterMetricFamily, Kind.GAUGE: GaugeMetricFamily, Kind.HISTOGRAM: HistogramMetricFamily}
        return {d.name: cls[d.kind](d.name, d.help, labels=list(d.labels)) for d in WORKER_METRICS}

    def _ingest(self, wid: str, role: str, stats: WorkerStats | None) -> None:
        st = self._workers.get(wid)
        if st is None:
            st = self._workers[wid] = _WorkerState(self.pool_of(wid, role))
        if stats is None:  # re-registered after a restart, not polled yet: keep the totals
            return
        values: dict[str, float] = {}
        for d in self._monotonic:
            v = d.source(stats)
            if v is None:
                continue
            values.update(_flatten(d, v))
            if d.kind is Kind.HISTOGRAM:
                st.hist_bounds[d.name] = [float(b) for b in v.bounds]
        incarnation = stats.started_at
        restarted = st.incarnation is not None and incarnation != st.incarnation
        if restarted:
            for k, v in st.last.items():
                st.base[k] = st.base.get(k, 0.0) + v
            st.last = {}
            st.restarts += 1
        st.incarnation = incarnation
        st.last.update(values)

    def _add_monotonic(self, fams: dict[str, Metric], st: _WorkerState, base: dict[str, str]) -> None:
        for d in self._monotonic:
            labels = [base[k] for k in d.labels]
            if d.kind is Kind.COUNTER:
                if d.name in st.last or d.name in st.base:
                    fams[d.name].add_metric(labels, st.total(d.name))
                continue
            bounds = st.hist_bounds.get(d.name)
            if bounds is None:
                continue
            buckets = [(floatToGoString(b), st.total(f"{d.name}|le={b!r}")) for b in bounds if not math.isinf(b)]
            buckets.append(("+Inf", st.total(f"{d.name}|count")))
            fams[d.name].add_metric(labels, buckets, st.total(f"{d.name}|sum"))


async def poll_loads(router: Router, interval_s: float = 1.0) -> None:
    """Refresh the router's load reports forever (run as a task; cancel it to stop).

    The Ray controller's health watcher already does this; a LocalCluster needs it for the
    worker-side metrics to move."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    while True:
        await router.refresh_loads()
        await asyncio.sleep(interval_s)
