"""LocalCluster: every worker of a ServeConfig as plain objects in this process (no Ray).

For tests and single-process use; the Ray controller builds the same workers as actors.
Worker ids are ``<pool name>-<index>``. Mixed-pool workers are DecodeWorkers that prefill
locally; they also get a KV receiver so a prefill worker can still hand them requests.
"""

from __future__ import annotations

from typing import Any

from cluster.config import ServeConfig
from cluster.control.handles import LocalHandle
from cluster.control.router import Router
from cluster.control.routing import RoutingPolicy
from decode_worker.build import build_decode_worker
from prefill_worker.build import build_prefill_worker


class LocalCluster:
    def __init__(self, config: ServeConfig, read_timeout_s: float = 1.0):
        self.config = config
        self.workers: dict[str, Any] = {}
        self.router = Router(RoutingPolicy(config.router), read_timeout_s=read_timeout_s)
        t = config.transfer
        for pool in config.pools:
            for i in range(pool.num_workers):
                wid = f"{pool.name}-{i}"
                if pool.role == "prefill":
                    w = build_prefill_worker(
                        config.model,
                        pool.engine,
                        t.kind,
                        worker_id=wid,
                        layerwise=t.layerwise,
                        transfer_timeout_s=t.timeout_s,
                    )
                    self.router.add_worker(wid, LocalHandle(wid, w), pool.role)
                else:
                    w = build_decode_worker(
                        config.model, pool.engine, t.kind, worker_id=wid, transfer_timeout_s=t.timeout_s
                    )
                    self.router.add_worker(wid, LocalHandle(wid, w), pool.role, w.address)
                self.workers[wid] = w

    async def start(self) -> LocalCluster:
        await self.router.refresh_loads()
        return self

    def shutdown(self) -> None:
        for w in self.workers.values():
            w.shutdown()
