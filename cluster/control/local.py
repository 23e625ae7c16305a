"""LocalCluster: every worker of a ServeConfig as plain objects in this process (no Ray).

For tests and single-process use; the Ray controller builds the same workers as actors.
Worker ids are ``<pool name>-<index>``. Mixed-pool workers are DecodeWorkers that prefill
locally; they also get a KV receiver so a prefill worker can still hand them requests.

Lifecycle: ``LocalCluster(config)`` builds the workers -> ``await start()`` collects their
limits and a first stats report -> ``router.generate(...)`` -> ``shutdown()``.
"""

from __future__ import annotations

from cluster.config import ServeConfig
from cluster.control.handles import local_decode, local_prefill
from cluster.control.info import ClusterInfo, pool_info, worker_info
from cluster.control.router import Router
from cluster.control.routing import RoutingPolicy
from decode_worker.build import build_decode_worker
from decode_worker.worker import DecodeWorker
from prefill_worker.build import build_prefill_worker
from prefill_worker.worker import PrefillWorker


class LocalCluster:
    def __init__(self, config: ServeConfig, read_timeout_s: float = 1.0):
        self.config = config
        self.workers: dict[str, PrefillWorker | DecodeWorker] = {}
        self.pool_of: dict[str, str] = {}  # worker id -> pool name
        self.router = Router(RoutingPolicy(config.router), read_timeout_s=read_timeout_s)
        t = config.transfer
        for pool in config.pools:
            for i in range(pool.num_workers):
                wid = f"{pool.name}-{i}"
                if pool.role == "prefill":
                    pw = build_prefill_worker(
                        config.model,
                        pool.engine,
                        t.kind,
                        worker_id=wid,
                        layerwise=t.layerwise,
                        transfer_timeout_s=t.timeout_s,
                    )
                    self.router.add_worker(wid, local_prefill(wid, pw), pool.role)
                    self.workers[wid] = pw
                else:
                    dw = build_decode_worker(
                        config.model, pool.engine, t.kind, worker_id=wid, transfer_timeout_s=t.timeout_s, role=pool.role
                    )
                    self.router.add_worker(wid, local_decode(wid, dw), pool.role, dw.kv_address())
                    self.workers[wid] = dw
                self.pool_of[wid] = pool.name

    async def start(self) -> LocalCluster:
        await self.router.collect_limits()
        await self.router.refresh_loads()
        return self

    def info(self) -> ClusterInfo:
        return ClusterInfo(
            model=self.config.model,
            transfer=self.config.transfer.kind,
            placement="none",
            pools=tuple(
                pool_info(p, [w for w, name in self.pool_of.items() if name == p.name]) for p in self.config.pools
            ),
            workers=tuple(
                worker_info(self.router, wid, self.pool_of[wid], self.router.workers[wid].role, node_id="local")
                for wid in self.workers
            ),
            requests_in_flight=len(self.router.requests),
        )

    def shutdown(self) -> None:
        for w in self.workers.values():
            w.shutdown()
