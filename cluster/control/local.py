"""LocalCluster: every worker of a ServeConfig as plain objects in this process (no Ray).

For tests and single-process use; the Ray controller builds the same workers as actors.
Worker ids are ``<pool name>-<index>``. Mixed-pool workers are DecodeWorkers that prefill
locally; they also get a KV receiver so a prefill worker can still hand them requests.

Lifecycle: ``LocalCluster(config)`` builds the workers and the state store ->
``await start()`` starts the store, loads the router's prefix index, collects the workers'
limits and a first stats report -> ``router.generate(...)`` -> ``shutdown()`` (the workers)
and ``await close_store()``; ``await stop()`` does both.

Faults, for tests of the failover path: ``await kill_worker(wid)`` stops a worker and tells
the router it is lost (what the Ray controller does when an actor dies);
``replace_worker(wid)`` builds a fresh one under the same id (what the controller's
replacement does).

Attention pools (role ``attention``, attention offload): worker ``<pool>-<i>`` is an
AttentionWorker (not routed to). Each of the M decode-capable workers is built as the model
worker of its own N / M attention workers (cluster/control/attention_groups.py: model worker i
gets attention workers [i*N/M, (i+1)*N/M)), an OffloadedEngine sized to their blocks, and
``start`` forms one group per model worker, [model worker, its attention workers]
(``attn/<model worker id>``, gloo), before serving. Each attention worker has a KV receiver of
the transfer kind: a prefill pool's workers push each request's KV straight to the attention
worker it is placed on (its model worker's start_transfer names it).
``shutdown`` stops the model workers first (their CLOSE ends the attention workers' loops).

Expert-parallel pools (``experts`` > 1; decode, mixed or prefill): worker ``<pool>-<i>`` is built as EP rank i and
``start`` forms each pool's group (gloo over localhost, ``form_group`` as the controller
does) before serving. ``replace_worker`` refuses an EP member (the controller replaces a
broken group as a whole; this in-process cluster does not).

Tensor-parallel pools (``tensor_parallel`` = N > 1): worker ``<pool>-<i>`` is N EngineCore
shards in this process over the gloo group ``tp/<pool>-<i>`` (decode_worker/ and
prefill_worker/tensor_parallel.py: rank 0 the routed worker, ranks 1..N-1 followers replaying
its engine calls). KV moves between pools of any TP degrees as whole-head pages: a TP decode
worker's receiver cuts them by head for its ranks, a TP prefill worker gathers them over its
group before sending. ``kill_worker`` and ``replace_worker`` stop and rebuild every rank (a
new group).
"""

from __future__ import annotations

from typing import Any

from attention_offload.worker import AttentionWorker, attention_blocks, attention_engine_config, build_attention_worker
from cluster.config import ATTENTION_ROLE, ConfigError, PoolConfig, ServeConfig
from cluster.control.attention_groups import group_of, model_worker_blocks, plan_attention_groups
from cluster.control.ep_options import ep_rank_options, read_ep_files
from cluster.control.expert_affinity import build_expert_affinities
from cluster.control.groups import form_group, group_backend
from cluster.control.handles import (
    AttentionHandle,
    DecodeHandle,
    PrefillHandle,
    local_attention,
    local_decode,
    local_prefill,
)
from cluster.control.info import ClusterInfo, pool_info, worker_info
from cluster.control.router import Router
from cluster.control.routing import RoutingPolicy
from cluster.control.state import StateStore, make_state_store
from decode_worker.build import build_decode_worker
from decode_worker.tensor_parallel import build_tp_decode_worker
from decode_worker.worker import DecodeWorker
from engine.runtime.groups import GroupBackend
from engine.runtime.tensor_parallel import TPWorker
from kv_transfer import ReceiverFactory
from prefill_worker.build import build_prefill_worker
from prefill_worker.tensor_parallel import build_tp_prefill_worker
from prefill_worker.worker import PrefillWorker


class LocalCluster:
    def __init__(
        self,
        config: ServeConfig,
        read_timeout_s: float = 1.0,
        store: StateStore | None = None,
        transport_options: dict[str, Any] | None = None,
        ep_group_timeout_s: float = 30.0,
    ):
        self.config = config
        self.transport_options = dict(transport_options or {})
        self.workers: dict[str, PrefillWorker | DecodeWorker] = {}  # routed workers
        self.pool_of: dict[str, str] = {}  # worker id -> pool name
        self.store = store if store is not None else make_state_store(config.state)
        self.router = Router(
            RoutingPolicy(config.router, affinities=build_expert_affinities(config)),
            read_timeout_s=read_timeout_s,
            failover=config.failover,
            store=self.store,
        )
        self.killed: set[str] = set()
        self.ep_group_timeout_s = ep_group_timeout_s
        # TP workers (routed rank 0 + follower ranks), by routed worker id
        self.tp_workers: dict[str, TPWorker[DecodeWorker] | TPWorker[PrefillWorker]] = {}
        self.handles: dict[str, DecodeHandle] = {}  # decode-capable workers' handles
        self.prefill_handles: dict[str, PrefillHandle] = {}
        # EP pools' files (placement JSON, routing log), read once
        self._ep_files = {pool.name: read_ep_files(pool, i) for i, pool in enumerate(config.pools) if pool.experts > 1}
        self.attention: dict[str, AttentionWorker] = {}  # attention workers by id
        self.attention_handles: dict[str, AttentionHandle] = {}
        att = config.attention_pool()
        self.attention_groups = plan_attention_groups(config)  # one per model worker
        # blocks per attention worker of each model worker's group, by model worker id
        self._attention_blocks: dict[str, list[int]] = (
            {}
            if att is None
            else model_worker_blocks(
                self.attention_groups, attention_blocks(attention_engine_config(config.model, att.engine))
            )
        )
        for pool in config.pools:
            for i in range(pool.num_workers):
                self._build(f"{pool.name}-{i}", pool)

    def _build(self, wid: str, pool: PoolConfig) -> None:
        t = self.config.transfer
        bound = self.config.failover.worker_max_pending
        if pool.role == ATTENTION_ROLE:
            aw = build_attention_worker(
                self.config.model,
                pool.engine,
                worker_id=wid,
                receiver_factory=ReceiverFactory(
                    t.kind
                ),  # prefill workers push KV here (transport_options: senders only)
            )
            self.attention[wid] = aw
            self.attention_handles[wid] = local_attention(wid, aw)
        elif pool.role == "prefill" and pool.tensor_parallel > 1:  # N shards in this process, group tp/<wid>
            tp = build_tp_prefill_worker(
                self.config.model,
                pool.engine,
                pool.tensor_parallel,
                wid,
                t.kind,
                self.transport_options or None,
                layerwise=t.layerwise,
                transfer_timeout_s=t.timeout_s,
                max_pending=bound,
                group_timeout_s=self.ep_group_timeout_s,
            )
            self.tp_workers[wid] = tp
            self.router.add_worker(wid, local_prefill(wid, tp.worker), pool.role)
            self.workers[wid] = tp.worker
        elif pool.role == "prefill":
            pw = build_prefill_worker(
                self.config.model,
                pool.engine,
                t.kind,
                self.transport_options or None,
                worker_id=wid,
                layerwise=t.layerwise,
                transfer_timeout_s=t.timeout_s,
                max_pending=bound,
                ep=ep_rank_options(pool, wid, self._ep_files.get(pool.name)),
            )
            self.prefill_handles[wid] = local_prefill(wid, pw)
            self.router.add_worker(wid, self.prefill_handles[wid], pool.role)
            self.workers[wid] = pw
        elif pool.tensor_parallel > 1:  # N shards in this process, group tp/<wid>
            tw = build_tp_decode_worker(
                self.config.model,
                pool.engine,
                pool.tensor_parallel,
                wid,
                role=pool.role,
                max_pending=bound,
                group_timeout_s=self.ep_group_timeout_s,
                transport=t.kind,
                transfer_timeout_s=t.timeout_s,
            )
            self.tp_workers[wid] = tw
            self.handles[wid] = local_decode(wid, tw.worker)
            self.router.add_worker(wid, self.handles[wid], pool.role, tw.worker.kv_address())
            self.workers[wid] = tw.worker
        else:
            dw = build_decode_worker(
                self.config.model,
                pool.engine,
                t.kind,
                worker_id=wid,
                transfer_timeout_s=t.timeout_s,
                role=pool.role,
                max_pending=bound,
                attention_blocks=self._attention_blocks.get(wid),
                ep=ep_rank_options(pool, wid, self._ep_files.get(pool.name)),
            )
            self.handles[wid] = local_decode(wid, dw)
            self.router.add_worker(wid, self.handles[wid], pool.role, dw.kv_address())
            self.workers[wid] = dw
        self.pool_of[wid] = pool.name

    async def start(self) -> LocalCluster:
        for pool in self.config.pools:
            if pool.experts > 1:
                handles = self.prefill_handles if pool.role == "prefill" else self.handles
                members = [handles[f"{pool.name}-{i}"] for i in range(pool.num_workers)]
                backend = _in_process_backend([pool])
                await form_group(f"ep/{pool.name}", members, backend=backend, timeout_s=self.ep_group_timeout_s)
        att = self.config.attention_pool()
        for plan in self.attention_groups:  # one group per model worker, over its own attention workers
            assert att is not None
            model = self.handles[plan.model_worker]
            members = [model, *(self.attention_handles[w] for w in plan.attention_workers)]
            backend = _in_process_backend([att, self.config.pool(self.pool_of[plan.model_worker])])
            await form_group(plan.name, members, backend=backend, timeout_s=self.ep_group_timeout_s)
        await self.store.start()
        await self.router.start()
        await self.router.collect_limits()
        await self.router.refresh_loads()
        return self

    # ------------------------------------------------------------ faults (tests)
    async def kill_worker(self, worker_id: str) -> None:
        """Stop ``worker_id`` (its engine loop ends; calls to it fail) and declare it lost."""
        self.workers[worker_id].shutdown()
        self._stop_tp_followers(worker_id)
        self.killed.add(worker_id)
        await self.router.worker_lost(worker_id, "killed")

    def replace_worker(self, worker_id: str) -> None:
        """A fresh worker under ``worker_id`` (new engine, empty KV pool, new KV address)."""
        pool = self.config.pool(self.pool_of[worker_id])
        if group_of(self.attention_groups, worker_id) is not None:
            raise NotImplementedError(
                f"{worker_id}: a model worker and its attention workers are replaced as one group "
                "(not supported in process)"
            )
        if pool.experts > 1:
            raise NotImplementedError(
                f"{worker_id} is a member of expert-parallel pool {pool.name!r}: its group is replaced as a whole "
                "(the Ray Controller does that), not one worker in process"
            )
        old = self.workers[worker_id]
        if worker_id not in self.killed:
            old.shutdown()
            self._stop_tp_followers(worker_id)
        self.killed.discard(worker_id)
        self._build(worker_id, self.config.pool(self.pool_of[worker_id]))

    def _stop_tp_followers(self, worker_id: str) -> None:
        """A TP worker's follower ranks end with it (after its loop stopped: no step is pending)."""
        tw = self.tp_workers.pop(worker_id, None)
        if tw is not None:
            tw.stop_followers()

    # ------------------------------------------------------------ introspection
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
            attention_workers=tuple(w.stats() for w in self.attention.values()),
            attention_groups=self.attention_groups,
            requests_in_flight=len(self.router.requests),
            state=self.store.health(),
        )

    def shutdown(self) -> None:
        for wid, w in self.workers.items():
            if wid not in self.killed:
                w.shutdown()
                self._stop_tp_followers(wid)
        for w in self.attention.values():  # after the model worker's CLOSE: their loops have ended
            w.shutdown()

    async def close_store(self) -> None:
        await self.store.close()

    async def stop(self) -> None:
        self.shutdown()
        await self.close_store()


def _in_process_backend(pools: list[PoolConfig]) -> GroupBackend:
    """In process the ranks are threads of this process: gloo ("auto" too), or shm where a pool
    asks for it (``group_transport``). NCCL between threads of one process is not supported."""
    if all(p.group_transport == "auto" for p in pools):
        return "gloo"
    backend = group_backend(pools)
    if backend == "nccl":
        raise ConfigError(
            "group_transport", "'nccl' needs one process per rank (Ray, serve); LocalCluster's ranks are threads"
        )
    return backend
