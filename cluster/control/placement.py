"""Placement groups for the worker pools: one bundle per worker, reserved all at once.

Why: without one, each actor is placed on its own, so a cluster that can host only some of
the workers starts half of them, and shm pairs may land on different nodes. A placement
group reserves every worker's resources atomically (an autoscaler sees the whole demand) and
STRICT_PACK keeps shm peers on one node.

Lifecycle (driven by the Controller)::

    WorkerPlacement.create(config)    None when the strategy is "none" (or nothing to reserve)
    await placement.ready(timeout)    the group is placed, or RuntimeError naming the demand
    placement.actor_options(wid)      the worker's bundle: same bundle on every restart (a
                                      dead actor's share of the bundle is free again at once)
    placement.remove()                at shutdown or when start() fails; idempotent

A tensor-parallel worker (pool ``tensor_parallel`` = N) has one bundle per rank, each of the
pool's resources (they are per rank), keyed by ``rank_ids``: rank 0 is the worker id, rank r
``<worker id>/tp<r>``.

A worker whose pool asks for no resources at all (0 CPUs, 0 GPUs, no custom resources) has
no bundle (Ray refuses empty bundles) and is placed freely.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import PoolConfig, ServeConfig

log = logging.getLogger(__name__)


def resolve_strategy(config: ServeConfig) -> str:
    """The Ray strategy for ``config.placement`` ("none" for no placement group)."""
    if config.placement != "auto":
        return config.placement
    return "STRICT_PACK" if config.transfer.kind == "shm" else "PACK"


def worker_bundle(pool: PoolConfig) -> dict[str, float]:
    """One worker's resources as a bundle (zero amounts dropped)."""
    res = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    return {k: float(v) for k, v in res.items() if v > 0}


def rank_ids(worker_id: str, pool: PoolConfig) -> list[str]:
    """The actor ids of a worker's ranks: [worker_id] at TP 1, else [worker_id, <id>/tp1, ...]."""
    return [worker_id, *(f"{worker_id}/tp{r}" for r in range(1, pool.tensor_parallel))]


class WorkerPlacement:
    def __init__(self, strategy: str, bundles: dict[str, dict[str, float]]):
        self.strategy = strategy
        self.index = {wid: i for i, wid in enumerate(bundles)}  # worker id -> bundle index
        self.bundles = list(bundles.values())
        self.group = placement_group(self.bundles, strategy=strategy, name="")
        self._removed = False

    @staticmethod
    def create(config: ServeConfig) -> WorkerPlacement | None:
        strategy = resolve_strategy(config)
        if strategy == "none":
            return None
        bundles = {}
        for pool in config.pools:
            for i in range(pool.num_workers):
                bundle = worker_bundle(pool)
                if bundle:
                    for actor_id in rank_ids(f"{pool.name}-{i}", pool):
                        bundles[actor_id] = bundle
        return WorkerPlacement(strategy, bundles) if bundles else None

    def describe(self) -> str:
        total: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        shown = ", ".join(f"{k}: {v:g}" for k, v in sorted(total.items()))
        return f"{self.strategy} placement group of {len(self.bundles)} bundles ({{{shown}}} in all)"

    async def ready(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.group.ready(), timeout_s)
        except TimeoutError:
            have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith(("node:", "memory", "object"))}
            where = "one node" if self.strategy == "STRICT_PACK" else "the cluster"
            raise RuntimeError(
                f"{self.describe()} was not placed within {timeout_s:g}s: {where} must hold it "
                f"(cluster has {have}); use placement 'none' to place workers one by one"
            ) from None

    def actor_options(self, worker_id: str) -> dict[str, Any]:
        """Extra ``.options()`` for the worker's actor ({} when it has no bundle)."""
        i = self.index.get(worker_id)
        if i is None:
            return {}
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=i
            )
        }

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        try:
            remove_placement_group(self.group)
        except Exception as e:  # the cluster may be gone already at shutdown
            log.debug("removing the placement group failed: %s", e)
