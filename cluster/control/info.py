"""What the control plane reports about itself: pools, workers, their roles, health and load.

``ClusterInfo`` is built by the Ray ``Controller`` and by the in-process ``LocalCluster``
(``info()``), printed by ``splitserve serve`` and served by ``GetServerInfo``. Every field is
required; a worker not polled yet has ``stats=None`` (shown as unknown, never as 0 blocks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attention_offload.api import AttentionWorkerStats
from cluster.config import PoolConfig
from cluster.control.attention_groups import AttentionGroupPlan, group_of
from cluster.control.router import Router
from cluster.control.state import StoreHealth
from engine.runtime.tp_follower import TPFollowerStats
from engine.types import WorkerStats


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    pool: str
    role: str  # configured pool role
    current_role: str  # role now: a promoted decode worker is "mixed"
    healthy: bool
    restarting: bool  # being replaced by the controller
    node_id: str | None  # None until the worker is ready
    address: str | None  # KV receiver address, as text (decode-capable workers)
    restarts: int
    last_failure: str | None
    inflight: int  # requests the router placed here and has not seen finish
    stats: WorkerStats | None  # last report; None until the first poll


@dataclass(frozen=True)
class PoolInfo:
    name: str
    role: str
    num_workers: int
    num_cpus: float
    num_gpus: float
    resources: dict[str, float]
    workers: tuple[str, ...]
    tensor_parallel: int = 1  # ranks (actors) per worker; resources above are per rank


@dataclass(frozen=True)
class ClusterInfo:
    model: str
    transfer: str  # KV transport kind
    placement: str  # placement-group strategy in force, or "none"
    pools: tuple[PoolInfo, ...]
    workers: tuple[WorkerInfo, ...]
    requests_in_flight: int
    state: StoreHealth  # the state store: backend, durable, ok or degraded (and why)
    # the attention pool's workers (attention offload; not routed): state and KV blocks each
    attention_workers: tuple[AttentionWorkerStats, ...] = ()
    # tensor-parallel workers' follower ranks 1..N-1 (not routed; their rank 0 is in
    # ``workers``): group joined, calls applied, KV pool, failure; by the last health round
    tp_ranks: tuple[TPFollowerStats, ...] = ()
    # which attention workers hold which model worker's KV (cluster/control/attention_groups.py)
    attention_groups: tuple[AttentionGroupPlan, ...] = ()

    def attention_free_blocks(self, worker: AttentionWorkerStats) -> int | None:
        """An attention worker's free pages, as ITS model worker's engine accounts them (the
        shard keeps no accounting; each model worker reports its own shards only); None before
        it joined its group or before its model worker's report."""
        plan = group_of(self.attention_groups, worker.worker_id)
        if worker.shard is None or plan is None:
            return None
        model = next((w for w in self.workers if w.worker_id == plan.model_worker), None)
        report = model.stats.attention if model is not None and model.stats is not None else None
        if report is None or worker.shard >= len(report.total_blocks):
            return None
        return report.total_blocks[worker.shard] - report.used_blocks[worker.shard]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (cached block hashes shown as a count)."""
        out = dataclasses.asdict(self)
        for w, info in zip(out["workers"], self.workers):
            if info.stats is not None:
                w["stats"]["cached_block_hashes"] = len(info.stats.cached_block_hashes)
        return out


def pool_info(pool: PoolConfig, worker_ids: list[str]) -> PoolInfo:
    return PoolInfo(
        name=pool.name,
        role=pool.role,
        num_workers=pool.num_workers,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        resources=dict(pool.resources),
        workers=tuple(worker_ids),
        tensor_parallel=pool.tensor_parallel,
    )


def worker_info(
    router: Router,
    worker_id: str,
    pool: str,
    role: str,
    *,
    node_id: str | None = None,
    restarting: bool = False,
    restarts: int = 0,
    last_failure: str | None = None,
) -> WorkerInfo:
    """A worker's info from the router's view of it (health, load) and the caller's facts."""
    entry = router.workers.get(worker_id)
    current = router.policy.roles().get(worker_id, role)
    return WorkerInfo(
        worker_id=worker_id,
        pool=pool,
        role=role,
        current_role=current,
        healthy=entry is not None and entry.healthy and not restarting,
        restarting=restarting,
        node_id=node_id,
        address=None if entry is None or entry.address is None else str(entry.address),
        restarts=restarts,
        last_failure=last_failure,
        inflight=entry.inflight if entry is not None else 0,
        stats=entry.stats if entry is not None else None,
    )
