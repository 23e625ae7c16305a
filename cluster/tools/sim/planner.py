"""Prefill:decode planner: the split of N instances that best serves a target rate under SLOs.

    plan = sweep_ratio(model, num_instances=2000, target_rate=3000, workload=trace,
                       slo_ttft_s=1.0, slo_tpot_s=0.05)
    plan.best            # Candidate(num_prefill, num_decode, attainment, ...)

Score of a split: SLO attainment (requests meeting both SLOs / all requests, unfinished
ones count as misses), ties broken by the smaller headroom ratio
``max(p90 TTFT / slo_ttft, p90 TPOT / slo_tpot)`` (further from the SLO is better), then by
fewer prefill instances.

Search: splits ``P = 1 .. N-1`` (decode = N - P); a coarse grid of ``grid`` points, then
grids of halving step around the best until the step is 1, so about ``grid + 2 log2(N /
grid)`` simulations. Attainment is assumed to rise and then fall with P (too few prefill
instances: TTFT misses; too few decode instances: TPOT misses).

Large clusters are planned on a slice: with ``N > slice_instances`` every candidate is
simulated on ``N / k`` instances at ``rate / k`` (k = ceil(N / slice_instances)) - with
load-balanced routing, a pool of identical instances behaves much like k copies of a
k-times smaller one (a slice pools a little less, so it is slightly pessimistic) - and the
best slice split, scaled back up, is simulated once on the whole cluster at the full rate
(``Plan.full``, at most ``verify_requests`` requests). Every candidate of a sweep gets the
same seeded Poisson workload.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.tools.sim.model import StepTimeModel
from cluster.tools.sim.simulator import SimConfig, Simulator
from cluster.tools.sim.workload import Workload, poisson


@dataclass(frozen=True)
class Candidate:
    num_prefill: int
    num_decode: int
    attainment: float
    headroom: float  # max(p90 TTFT / slo_ttft, p90 TPOT / slo_tpot); < 1: p90 inside the SLO
    goodput_rps: float
    ttft_p90_s: float
    tpot_p90_s: float
    unfinished: int

    def score(self) -> tuple:
        """Larger is better."""
        return (self.attainment, -self.headroom, -self.num_prefill)


@dataclass
class Plan:
    num_instances: int
    target_rate: float
    slice_instances: int  # instances simulated per candidate (== num_instances: no slice)
    slice_rate: float
    candidates: list[Candidate]  # in evaluation order, on the slice
    best: Candidate  # best split, scaled to the whole cluster
    full: Candidate | None  # the best split simulated on the whole cluster (None: no slice)
    full_summary: dict[str, Any] | None
    wall_s: float
    simulations: int
    notes: list[str] = field(default_factory=list)


def _evaluate(
    model: StepTimeModel, base: SimConfig, work: Workload, p: int, d: int, slo_ttft_s: float, slo_tpot_s: float
) -> tuple[Candidate, dict[str, Any]]:
    cfg = replace(base, num_prefill=p, num_decode=d, num_mixed=0)
    s = Simulator(model, cfg).run(work).summary(slo_ttft_s, slo_tpot_s)
    ttft90, tpot90 = s["ttft_s"]["p90"], s["tpot_s"]["p90"]
    head = max(
        ttft90 / slo_ttft_s if not math.isnan(ttft90) else math.inf,
        tpot90 / slo_tpot_s if not math.isnan(tpot90) else 0.0,
    )
    cand = Candidate(p, d, s["slo"]["attainment"], head, s["slo"]["goodput_rps"], ttft90, tpot90, s["unfinished"])
    return cand, s


def sweep_ratio(
    model: StepTimeModel,
    num_instances: int,
    target_rate: float,
    workload: Workload,
    slo_ttft_s: float,
    slo_tpot_s: float,
    base: SimConfig | None = None,
    duration_s: float = 60.0,
    slice_instances: int = 64,
    grid: int = 8,
    verify_requests: int = 20000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Best prefill:decode split of ``num_instances`` for ``target_rate`` req/s of Poisson
    arrivals over ``duration_s`` seconds, lengths drawn from ``workload``."""
    if num_instances < 2:
        raise ValueError(f"need at least 2 instances to split, got {num_instances}")
    if target_rate <= 0 or duration_s <= 0:
        raise ValueError("target_rate and duration_s must be > 0")
    t0 = time.perf_counter()
    base = base or SimConfig()
    if base.horizon_s is None:
        # an overloaded split would drain its queues for a long time: stop the clock
        base = replace(base, horizon_s=duration_s * 3 + 60)
    k = max(1, math.ceil(num_instances / slice_instances))
    n = max(2, round(num_instances / k))
    rate = target_rate * n / num_instances
    work = poisson(workload, rate, duration_s=duration_s, seed=seed)
    seen: dict[int, Candidate] = {}
    order: list[Candidate] = []

    def ev(p: int) -> Candidate:
        if p not in seen:
            seen[p], _ = _evaluate(model, base, work, p, n - p, slo_ttft_s, slo_tpot_s)
            order.append(seen[p])
            if progress:
                c = seen[p]
                progress(
                    f"  prefill {p:>4} decode {n - p:>4}: attainment {c.attainment:6.1%}, "
                    f"p90 TTFT {c.ttft_p90_s * 1e3:9.1f} ms, p90 TPOT {c.tpot_p90_s * 1e3:7.1f} ms"
                )
        return seen[p]

    step = max(1, (n - 1) // grid)
    for p in range(1, n, step):
        ev(p)
    best = max(seen.values(), key=Candidate.score)
    while step > 1:
        step = max(1, step // 2)
        for p in (best.num_prefill - step, best.num_prefill + step):
            if 1 <= p <= n - 1:
                ev(p)
        best = max(seen.values(), key=Candidate.score)
    ok = sorted(c.num_prefill for c in order if c.attainment >= 0.9)
    notes = []
    if ok:
        notes.append(f"splits with >= 90% SLO attainment on the slice: prefill {ok[0]}..{ok[-1]} of {n}")
    full = full_summary = None
    if k > 1:
        p_full = min(num_instances - 1, max(1, round(best.num_prefill * num_instances / n)))
        full_work = poisson(workload, target_rate, duration_s=duration_s, num_requests=verify_requests, seed=seed)
        full, full_summary = _evaluate(model, base, full_work, p_full, num_instances - p_full, slo_ttft_s, slo_tpot_s)
        notes.append(
            f"searched on a 1/{k} slice ({n} instances at {rate:.4g} req/s); the best slice split "
            f"scaled to {p_full}:{num_instances - p_full} and simulated once on the whole cluster"
        )
        scaled = full
    else:
        scaled = best
    if scaled.attainment < 0.9:
        notes.append(f"no split reaches 90% SLO attainment at {target_rate:g} req/s: more instances needed")
    return Plan(
        num_instances=num_instances,
        target_rate=target_rate,
        slice_instances=n,
        slice_rate=rate,
        candidates=order,
        best=scaled,
        full=full,
        full_summary=full_summary,
        wall_s=time.perf_counter() - t0,
        simulations=len(order) + (1 if full is not None else 0),
        notes=notes,
    )
