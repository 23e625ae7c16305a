"""Cumulative histograms the workers keep and report in ``stats()`` (cluster.metrics.workers
exports them as Prometheus histograms). Plain Python, no locks: each worker updates and
reports its histograms on its engine loop thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.types import HistogramReport, SpeculationReport

if TYPE_CHECKING:
    from engine.engine import EngineCore

# Bucket upper bounds (seconds).
QUEUE_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TRANSFER_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CumulativeHistogram:
    """Observation counts per bucket, ``counts[i]`` = observations <= ``bounds[i]`` (cumulative,
    as Prometheus buckets); ``count`` is the +Inf bucket. Only grows: a restart starts a new one."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1

    def report(self) -> HistogramReport:
        return HistogramReport(self.bounds, tuple(self.counts), self.sum, self.count)


def speculation_report(engine: EngineCore) -> SpeculationReport | None:
    """The engine's speculation counters as a worker reports them (None: no speculation)."""
    st = engine.spec_stats()
    if st is None:
        return None
    counts = list(st.k_counts)
    cumulative = [sum(counts[: k + 1]) for k in range(len(counts))]
    chosen = HistogramReport(
        bounds=tuple(float(k) for k in range(len(counts))),
        counts=tuple(cumulative),
        sum=float(sum(k * c for k, c in enumerate(counts))),
        count=sum(counts),
    )
    draft = st.draft_kv
    return SpeculationReport(
        st.proposed_tokens,
        st.accepted_tokens,
        chosen,
        draft_free_kv_blocks=draft.free_blocks if draft is not None else None,
        draft_total_kv_blocks=draft.total_blocks if draft is not None else None,
        proposer_faults=st.proposer_faults,
        proposer_disabled=st.proposer_disabled,
    )
