"""Controller: runs a ServeConfig's worker pools as Ray actors and keeps them alive.

Lives in the driver process (plain asyncio, not an actor). Lifecycle::

    Controller(config)            validates: the KV transport must cross processes
    await start()                 reserves a placement group with one bundle per worker
                                  (cluster/control/placement.py; STRICT_PACK for shm, PACK otherwise,
                                  none with placement "none"), then starts one actor per
                                  worker in its bundle, placed by the pool's num_cpus /
                                  num_gpus / custom resources (a KubeRay worker group that
                                  carries e.g. {"decode_node": 1} receives the pool asking
                                  for it); waits for every actor to load its model, registers
                                  them with the Router, collects their limits (what the
                                  frontend validates requests against), starts the health
                                  watcher
    ... router.generate(spec) ...
    await shutdown()              stops the watcher, shuts the workers down, kills the actors,
                                  removes the placement group

Worker ids are ``<pool name>-<index>`` (as in LocalCluster) and survive restarts.

Expert-parallel pools (``PoolConfig.experts`` > 1): worker ``<pool>-<i>`` is EP rank i (a
replacement keeps it). Once every actor is ready, ``start`` forms each EP pool's group
(cluster/control/groups.py ``form_group``, gloo, NCCL on GPU pools) before any worker is
registered with the router. The group lives and dies as one (a broken gloo group cannot be
reused): when any member fails, every member is given up at once (``Router.worker_lost``:
their requests fail over, or wait for the group), all of them are restarted and the group is
formed again, and only then do they rejoin routing (``_replace_group``).

Attention pools (role ``attention``, attention offload): worker ``<pool>-<i>`` is an
AttentionActor, never routed to. Each of the M decode-capable workers is the model worker of
its own N / M attention workers (cluster/control/attention_groups.py: model worker i gets
attention workers [i*N/M, (i+1)*N/M); a replacement keeps them), built with their block
counts; once every actor is ready, ``start`` forms one group per model worker,
[model worker, its attention workers] (``attn/<model worker id>``), before routing starts.
Like an EP group each lives and dies as one: when a model worker or one of its attention
workers fails, that group's members are given up, restarted and the group formed again
(``_begin_replace_group``); the other groups keep serving, untouched.

Tensor-parallel pools (``PoolConfig.tensor_parallel`` = N > 1): worker ``<pool>-<i>`` is N
actors, one per rank, each in its own placement bundle (the pool's resources are per rank):
ranks 1..N-1 are TPFollowerActors ``<pool>-<i>/tp<r>`` (decode_worker/actor.py), started
first (in rank 0's engine mode); rank 0 is the routed DecodeActor or PrefillActor, started
with their handles (its engine a TPLeaderEngine sending them every engine call). Every rank loads its shard on its own (no
group needed for that), then the worker's group ``tp/<pool>-<i>`` is formed over
[rank 0, followers] (``ep_group_timeout_s`` bounds forming and every collective), and only
then is the worker routed. The followers are not workers of their own: they live in their
rank 0's record (``WorkerRecord.followers``), are pinged with it, and any rank failing
(actor death, a failed ping, rank 0's loop failing on a collective) replaces the whole TP
worker through the ordinary ``_replace``: every rank killed and started again, the group
formed again, then routed again.

Health watcher, every ``health_interval_s``:
- ``ping`` each actor (answered in the actor's control thread group, so it is not starved
  by blocking ``prefill``/``read`` calls). Actor dead, or its engine loop crashed
  (WorkerUnavailable): marked unhealthy at once and replaced. No answer within
  ``ping_timeout_s``: marked unhealthy; replaced after ``max_missed_pings`` misses in a row.
  An unhealthy worker that answers ``ping`` and ``stats`` again is marked healthy.
- ``router.refresh_loads()`` updates the stats (KV blocks, cached prefixes) routing uses.
Replacement first tells the router the worker is lost (``Router.worker_lost``: every request
placed on it fails over now, re-prefilled with its tokens so far on another worker, or waits
for this replacement when no other can serve it; cluster/control/failover.py) and removes it
from the worker registry; then it kills the old actor, starts a new one with the same worker
id and options, waits until it is ready (retrying with backoff while that fails),
re-registers it (a decode replacement has a new KV address) and bumps the worker's
``restarts`` counter.

State store (cluster/control/state/, ``ServeConfig.state``): started before any actor (a
wrong Redis password fails the start), closed by ``shutdown``. The health check stays the
liveness authority; the worker registry publishes its verdicts: each round writes a
heartbeat for every worker that answered its ping (an entry expires ``heartbeat_ttl_s``
after the last one, e.g. when this controller died), a worker being replaced is removed at
once, and its replacement appears at the first round after it is ready. A worker that
misses pings keeps its last heartbeat until it expires or the controller gives it up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from attention_offload.actor import AttentionActor
from attention_offload.api import AttentionWorkerStats
from attention_offload.worker import attention_blocks, attention_engine_config
from cluster.config import ATTENTION_ROLE, PoolConfig, ServeConfig
from cluster.control.attention_groups import (
    AttentionGroupPlan,
    group_of,
    model_worker_blocks,
    plan_attention_groups,
)
from cluster.control.ep_options import ep_rank_options, read_ep_files
from cluster.control.expert_affinity import build_expert_affinities
from cluster.control.groups import form_group, group_backend
from cluster.control.handles import (
    AttentionHandle,
    DecodeHandle,
    PrefillHandle,
    RayInvoker,
    TPFollowerHandle,
    WorkerUnavailable,
)
from cluster.control.info import ClusterInfo, pool_info, worker_info
from cluster.control.placement import WorkerPlacement, rank_ids
from cluster.control.router import Router
from cluster.control.routing import RoutingPolicy
from cluster.control.state import WorkerRegistration, make_state_store
from decode_worker.actor import DecodeActor, TPFollowerActor
from engine.runtime.tp_follower import TPFollowerStats
from engine.types import KVAddress
from kv_transfer import ReceiverFactory
from prefill_worker.actor import PrefillActor

log = logging.getLogger(__name__)

# Transports whose sender and receiver may live in different processes.
RAY_TRANSPORTS = ("shm", "grpc", "torch")
STILL_LOADING_EVERY_S = 15.0


@dataclass(frozen=True)
class ControllerOptions:
    health_interval_s: float = 1.0  # period of the health watcher
    ping_timeout_s: float = 5.0  # a ping (or recovery load probe) slower than this is a miss
    max_missed_pings: int = 3  # consecutive misses before a live-but-silent actor is replaced
    ready_timeout_s: float = 600.0  # model load + placement; longer is a failed start
    placement_timeout_s: float = 600.0  # the placement group not placed by then: start fails
    restart_backoff_s: float = 2.0  # wait between failed replacement attempts
    max_concurrency: int = 64  # Ray threads per actor for blocking prefill/read calls
    read_timeout_s: float = 1.0  # Router's long-poll period for decode reads
    shutdown_timeout_s: float = 10.0  # graceful worker shutdown before the actor is killed
    # forming an EP, attention or tensor-parallel group, and every collective in it: a dead
    # member fails its peers' next round within this (their loops stop, their requests fail
    # over), never a hang
    ep_group_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "health_interval_s",
            "ping_timeout_s",
            "ready_timeout_s",
            "read_timeout_s",
            "placement_timeout_s",
            "ep_group_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.restart_backoff_s < 0 or self.shutdown_timeout_s < 0:
            raise ValueError("restart_backoff_s and shutdown_timeout_s must be >= 0")
        if self.max_missed_pings < 1 or self.max_concurrency < 1:
            raise ValueError("max_missed_pings and max_concurrency must be >= 1")


@dataclass
class FollowerRank:
    """One follower rank of a tensor-parallel worker: changes on every restart of the worker."""

    worker_id: str  # "<pool>-<i>/tp<r>"
    actor: Any
    handle: TPFollowerHandle
    stats: TPFollowerStats | None = None  # last report (health round); None until polled


@dataclass(frozen=True)
class WorkerGroup:
    """Workers that live and die as one (one collective group): an EP pool's, or one model
    worker's attention group. ``members`` in rank order; replaced together, never reused."""

    name: str  # the group's name: ep/<pool> | attn/<model worker id>
    members: list[WorkerRecord]
    attention: AttentionGroupPlan | None = None  # an attention group's plan (None: EP)

    @property
    def kind(self) -> str:
        """For logs and failure reasons: "attention" or "expert-parallel"."""
        return "expert-parallel" if self.attention is None else "attention"


@dataclass
class WorkerRecord:
    """One worker slot. ``actor``/``handle``/``address``/``node_id`` change on restart."""

    worker_id: str
    pool: PoolConfig
    actor: Any  # ray ActorHandle of the current incarnation
    handle: PrefillHandle | DecodeHandle | AttentionHandle
    address: KVAddress | None = None  # KV receiver address (decode-capable workers)
    node_id: str | None = None
    restarts: int = 0  # replacements so far (for metrics)
    missed_pings: int = 0  # consecutive
    last_failure: str | None = None
    started_at: float = field(default_factory=time.time)
    # a tensor-parallel worker's ranks 1..N-1 (its record is rank 0's); replaced with it
    followers: list[FollowerRank] = field(default_factory=list)

    @property
    def role(self) -> str:
        return self.pool.role


class Controller:
    def __init__(
        self,
        config: ServeConfig,
        options: ControllerOptions | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        kind = config.transfer.kind
        if kind not in RAY_TRANSPORTS:
            raise ValueError(
                f"transfer.kind {kind!r} cannot move KV between Ray actors ('loopback' works only inside "
                f"one process): use one of {list(RAY_TRANSPORTS)} ('shm' within a node, 'grpc' or 'torch' across nodes)"
            )
        self.config = config
        self.options = options or ControllerOptions()
        self.store = make_state_store(config.state)
        self.router = Router(
            RoutingPolicy(config.router, affinities=build_expert_affinities(config)),
            read_timeout_s=self.options.read_timeout_s,
            failover=config.failover,
            store=self.store,
        )
        self.workers: dict[str, WorkerRecord] = {}
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._watcher: asyncio.Task | None = None
        self._replacing: dict[str, asyncio.Task] = {}
        self._closing = False
        self._placement: WorkerPlacement | None = None  # created by start(), removed by shutdown()
        # EP pools' files, read once here and handed to every rank's actor (actors may run on
        # nodes without them)
        self._ep_files = {pool.name: read_ep_files(pool, i) for i, pool in enumerate(config.pools) if pool.experts > 1}
        # attention offload: one group per model worker (attention_groups.py); blocks per
        # attention worker of each model worker's group, by model worker id (none: not one)
        self.attention_groups = plan_attention_groups(config)
        self._attention_stats: dict[str, AttentionWorkerStats] = {}  # last report, by health round
        att = config.attention_pool()
        self._attention_blocks: dict[str, list[int]] = (
            {}
            if att is None
            else model_worker_blocks(
                self.attention_groups, attention_blocks(attention_engine_config(config.model, att.engine))
            )
        )

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> Controller:
        """Start every pool's actors and wait until all are ready; raises if any fails."""
        if self.workers:
            raise RuntimeError("controller already started")
        if not ray.is_initialized():
            raise RuntimeError("ray is not initialised: call ray.init() (or join a cluster) first")
        await self.store.start()  # StoreConfigError (e.g. a wrong Redis password) before any actor
        health = self.store.health()
        self._progress(f"state store: {health.backend} ({health.status}: {health.detail})")
        self._warn_if_short_of_resources()
        slots = [(f"{p.name}-{i}", p) for p in self.config.pools for i in range(p.num_workers)]
        actors = sum(p.num_workers * p.tensor_parallel for p in self.config.pools)  # a TP worker: N actors
        what = f"{len(slots)} workers ({actors} actors)" if actors != len(slots) else f"{len(slots)} worker actors"
        self._progress(f"starting {what}: " + ", ".join(_pool_summary(p) for p in self.config.pools))
        self._placement = WorkerPlacement.create(self.config)
        if self._placement is not None:
            self._progress(f"reserving a {self._placement.describe()}")
            try:
                await self._placement.ready(self.options.placement_timeout_s)
            except BaseException:
                self._placement.remove()
                self._placement = None
                raise
        for wid, pool in slots:
            followers = self._spawn_followers(wid, pool)
            actor = self._spawn(wid, pool, followers)
            self.workers[wid] = WorkerRecord(wid, pool, actor, _handle(wid, pool, actor), followers=followers)
        t0 = time.monotonic()
        loading = set(self.workers)

        async def ready(rec: WorkerRecord) -> None:
            try:
                rec.address, rec.node_id = await self._ready_ranks(rec)
            finally:
                loading.discard(rec.worker_id)
            tp = f", tensor-parallel group of {len(rec.followers) + 1} ranks formed" if rec.followers else ""
            self._progress(f"  {rec.worker_id} ready on node {rec.node_id[:8]}{tp} ({time.monotonic() - t0:.1f}s)")

        async def heartbeat() -> None:  # big models take minutes to load: say who we wait for
            while True:
                await asyncio.sleep(STILL_LOADING_EVERY_S)
                self._progress(f"  still loading ({time.monotonic() - t0:.0f}s): {', '.join(sorted(loading))}")

        beat = asyncio.create_task(heartbeat())
        try:
            results = await asyncio.gather(*(ready(r) for r in self.workers.values()), return_exceptions=True)
        finally:
            beat.cancel()
        failed = [(wid, e) for wid, e in zip(self.workers, results) if isinstance(e, BaseException)]
        try:
            if failed:
                detail = "\n".join(f"  {wid}: {e}" for wid, e in failed)
                raise RuntimeError(f"{len(failed)} of {len(slots)} workers failed to start:\n{detail}")
            self._check_shm_locality(strict=True)
            for pool in self.config.pools:
                if pool.experts > 1:
                    await self._form_ep_group(pool, self._members(pool))
                    self._progress(f"  expert-parallel group {_ep_group_name(pool)} formed ({pool.experts} ranks)")
            for plan in self.attention_groups:
                await self._form_attention_group(plan)
                self._progress(
                    f"  attention group {plan.name} formed ({len(plan.attention_workers)} attention workers)"
                )
        except RuntimeError:
            await self._kill_all()  # nothing half-started stays behind
            self.workers.clear()
            self._remove_placement()
            raise
        for rec in self.workers.values():
            if rec.role != ATTENTION_ROLE:  # attention workers are not routed to
                self.router.add_worker(rec.worker_id, rec.handle, rec.role, rec.address)
        await self.router.start()
        await self.router.collect_limits()
        await self.router.refresh_loads()
        # a first report of the attention workers and TP followers (the health round refreshes it)
        for rec in self.workers.values():
            if isinstance(rec.handle, AttentionHandle):
                self._attention_stats[rec.worker_id] = await rec.handle.stats()
            for f in rec.followers:
                f.stats = await f.handle.stats()
        await self.store.heartbeat([self._registration(r) for r in self.workers.values()])
        self._watcher = asyncio.create_task(self._watch(), name="splitserve-health")
        return self

    async def shutdown(self) -> None:
        """Stop watching, shut every worker down (gracefully, then by force). Idempotent."""
        self._closing = True
        tasks = [t for t in (self._watcher, *self._replacing.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watcher = None
        self._replacing.clear()
        await self._kill_all()
        self._remove_placement()
        for wid in list(self.workers):
            self.router.remove_worker(wid)
            await self.store.deregister(wid)
        await self.store.close()

    def _remove_placement(self) -> None:
        if self._placement is not None:
            self._placement.remove()
            self._placement = None

    # ------------------------------------------------------------ introspection
    def info(self) -> ClusterInfo:
        """Pools, workers, roles, health and last stats report (GetServerInfo, the CLI)."""
        workers = tuple(
            worker_info(
                self.router,
                wid,
                rec.pool.name,
                rec.role,
                node_id=rec.node_id,
                restarting=wid in self._replacing,
                restarts=rec.restarts,
                last_failure=rec.last_failure,
            )
            for wid, rec in self.workers.items()
            if rec.role != ATTENTION_ROLE
        )
        pools = tuple(
            pool_info(p, [w for w, r in self.workers.items() if r.pool.name == p.name]) for p in self.config.pools
        )
        return ClusterInfo(
            model=self.config.model,
            transfer=self.config.transfer.kind,
            placement=self._placement.strategy if self._placement is not None else "none",
            pools=pools,
            workers=workers,
            requests_in_flight=len(self.router.requests),
            state=self.store.health(),
            attention_workers=tuple(self._attention_stats[w] for w in sorted(self._attention_stats)),
            tp_ranks=tuple(f.stats for r in self.workers.values() for f in r.followers if f.stats is not None),
            attention_groups=self.attention_groups,
        )

    # ------------------------------------------------------------ actors
    def _engine_options(self, pool: PoolConfig) -> dict[str, Any]:
        engine = dict(pool.engine)
        if pool.num_gpus > 0:
            engine.setdefault("device", "cuda")  # a GPU was reserved for this actor: use it
        return engine

    def _actor_options(self, actor_id: str, pool: PoolConfig) -> dict[str, Any]:
        """Ray options of one actor (a worker, or one rank of a TP worker): the pool's resources."""
        return {
            "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus,
            "resources": dict(pool.resources) or None,
            "max_restarts": 0,  # the controller replaces dead actors itself
            **(self._placement.actor_options(actor_id) if self._placement is not None else {}),
        }

    def _spawn_followers(self, wid: str, pool: PoolConfig) -> list[FollowerRank]:
        """A TP worker's ranks 1..N-1 (none for N = 1); they load their shards meanwhile."""
        out = []
        for rank, fid in enumerate(rank_ids(wid, pool)[1:], 1):
            mode = "prefill_only" if pool.role == "prefill" else "decode_only"  # rank 0's engine mode
            actor = TPFollowerActor.options(**self._actor_options(fid, pool)).remote(
                self.config.model, self._engine_options(pool), rank, pool.tensor_parallel, wid, mode
            )
            out.append(FollowerRank(fid, actor, TPFollowerHandle(fid, RayInvoker(fid, actor))))
        return out

    def _spawn(self, wid: str, pool: PoolConfig, followers: Sequence[FollowerRank] = ()) -> Any:
        engine = self._engine_options(pool)
        placement = {**self._actor_options(wid, pool), "max_concurrency": self.options.max_concurrency}
        t = self.config.transfer
        bound = self.config.failover.worker_max_pending
        if pool.role == ATTENTION_ROLE:
            # its KV receiver: prefill workers push the prompts' KV straight to it
            return AttentionActor.options(**placement).remote(self.config.model, engine, wid, ReceiverFactory(t.kind))
        if pool.role == "prefill":
            return PrefillActor.options(**placement).remote(
                self.config.model,
                engine,
                t.kind,
                None,
                wid,
                t.layerwise,
                t.timeout_s,
                bound,
                tp_followers=[f.actor for f in followers] or None,  # rank 0 of a TP prefill worker
                ep=ep_rank_options(pool, wid, self._ep_files.get(pool.name)),
            )
        # decode and mixed workers both decode; mixed ones also prefill locally (as LocalCluster)
        return DecodeActor.options(**placement).remote(
            self.config.model,
            engine,
            t.kind,
            None,
            wid,
            t.timeout_s,
            pool.role,
            bound,
            ep=ep_rank_options(pool, wid, self._ep_files.get(pool.name)),
            attention_blocks=self._attention_blocks.get(wid),  # set: a model worker of the attention pool
            tp_followers=[f.actor for f in followers] or None,  # rank 0 of a tensor-parallel worker
        )

    def _members(self, pool: PoolConfig) -> list[WorkerRecord]:
        """The pool's workers in rank order (``<pool>-0`` first)."""
        return sorted(
            (r for r in self.workers.values() if r.pool.name == pool.name),
            key=lambda r: int(r.worker_id.rsplit("-", 1)[1]),
        )

    async def _form_ep_group(self, pool: PoolConfig, members: list[WorkerRecord]) -> None:
        """Every member joins the pool's EP group (rank i = members[i]); raises
        GroupFormationError (a RuntimeError) naming the members that failed."""
        handles = [r.handle for r in members]
        assert all(isinstance(h, DecodeHandle | PrefillHandle) for h in handles)
        await form_group(
            _ep_group_name(pool),
            handles,  # type: ignore[arg-type]
            backend=group_backend([pool]),
            timeout_s=self.options.ep_group_timeout_s,
        )

    async def _ready_ranks(self, rec: WorkerRecord) -> tuple[KVAddress | None, str]:
        """``_wait_ready`` of the worker; for a TP worker also of every follower, then its group
        ``tp/<worker id>`` is formed (GroupFormationError, a RuntimeError, naming the ranks that
        failed). Returns rank 0's (KV address, node id)."""
        if not rec.followers:
            return await self._wait_ready(rec.handle, rec.pool)
        ready = await asyncio.gather(
            self._wait_ready(rec.handle, rec.pool), *(self._wait_ready(f.handle, rec.pool) for f in rec.followers)
        )
        await form_group(
            f"tp/{rec.worker_id}",
            [rec.handle, *(f.handle for f in rec.followers)],  # type: ignore[list-item]
            backend=group_backend([rec.pool]),
            timeout_s=self.options.ep_group_timeout_s,
        )
        return ready[0]

    def _kill_ranks(self, rec: WorkerRecord) -> None:
        """Kill the worker's actor and its TP followers' (they may be hung rather than dead)."""
        ray.kill(rec.actor, no_restart=True)
        for f in rec.followers:
            ray.kill(f.actor, no_restart=True)

    def _records(self, plan: AttentionGroupPlan) -> list[WorkerRecord]:
        """An attention group's records in rank order: its model worker, its attention workers."""
        return [self.workers[wid] for wid in plan.members]

    async def _form_attention_group(self, plan: AttentionGroupPlan) -> None:
        """Its current incarnations join ``attn/<model worker>`` (rank 0 the model worker);
        GroupFormationError (a RuntimeError) names the members that failed."""
        members = self._records(plan)
        # the attention pool's transport decides (members[1:]), then the model worker's pool's
        await form_group(
            plan.name,
            [r.handle for r in members],  # type: ignore[misc]
            backend=group_backend([r.pool for r in (*members[1:], members[0])]),
            timeout_s=self.options.ep_group_timeout_s,
        )

    async def _wait_ready(
        self, handle: PrefillHandle | DecodeHandle | AttentionHandle | TPFollowerHandle, pool: PoolConfig
    ) -> tuple[KVAddress | None, str]:
        """(KV address, node id) once the actor has built its worker."""
        try:
            await asyncio.wait_for(handle.ping(), self.options.ready_timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"not ready after {self.options.ready_timeout_s:.0f}s; it needs {_pool_request(pool)} "
                f"(cluster has {_fmt_resources(ray.cluster_resources())})"
            ) from None
        address = await handle.kv_address() if isinstance(handle, DecodeHandle) else None
        return address, await handle.node_id()

    async def _kill_all(self) -> None:
        async def stop(rec: WorkerRecord) -> None:
            for h in (rec.handle, *(f.handle for f in rec.followers)):  # rank 0 first: its loop stops stepping
                try:
                    await asyncio.wait_for(h.shutdown(), self.options.shutdown_timeout_s)
                except Exception as e:  # dead, hung or never started: killing is all that is left
                    log.debug("graceful shutdown of %s failed: %s", h.worker_id, e)
            self._kill_ranks(rec)

        await asyncio.gather(*(stop(r) for r in self.workers.values()))

    # ------------------------------------------------------------ health
    async def _watch(self) -> None:
        while not self._closing:
            try:
                await self.check_health()
            except Exception:  # the watcher must outlive any one bad round
                log.exception("health check round failed")
            await asyncio.sleep(self.options.health_interval_s)

    async def check_health(self) -> None:
        """One watcher round: ping every worker not being replaced, heartbeat those that
        answered into the worker registry, then refresh loads."""
        live = [r for wid, r in self.workers.items() if wid not in self._replacing]
        answered = await asyncio.gather(*(self._check(r) for r in live))
        await self.store.heartbeat([self._registration(r) for r, ok in zip(live, answered) if ok])
        await self.router.refresh_loads()

    def _registration(self, rec: WorkerRecord) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=rec.worker_id,
            role=rec.role,
            pool=rec.pool.name,
            address=None if rec.address is None else str(rec.address),
            node_id=rec.node_id,
            incarnation=rec.started_at,
            heartbeat_at=time.time(),
        )

    async def _check(self, rec: WorkerRecord) -> bool:
        """Ping one worker; True when it answered (its registry heartbeat is due)."""
        wid, timeout = rec.worker_id, self.options.ping_timeout_s
        try:
            # a TP worker answers for every rank: a follower's failure is the worker's
            await asyncio.wait_for(
                asyncio.gather(rec.handle.ping(), *(f.handle.ping() for f in rec.followers)), timeout
            )
            if isinstance(rec.handle, AttentionHandle):
                self._attention_stats[wid] = await asyncio.wait_for(rec.handle.stats(), timeout)
            if rec.followers:
                reports = await asyncio.wait_for(asyncio.gather(*(f.handle.stats() for f in rec.followers)), timeout)
                for f, report in zip(rec.followers, reports, strict=True):
                    f.stats = report
            entry = self.router.workers.get(wid)
            if entry is not None and not entry.healthy:
                await asyncio.wait_for(rec.handle.stats(), timeout)  # the engine loop answers too
                self.router.mark_healthy(wid)
            rec.missed_pings = 0
            return True
        except TimeoutError:
            rec.missed_pings += 1
            self.router.mark_unhealthy(wid)
            if rec.missed_pings >= self.options.max_missed_pings:
                self._begin_replace(rec, f"missed {rec.missed_pings} pings of {timeout}s")
        except Exception as e:  # WorkerUnavailable (dead actor, crashed loop) or a broken actor
            self._begin_replace(rec, str(e) if isinstance(e, WorkerUnavailable) else f"ping failed: {e!r}")
        return False

    def _begin_replace(self, rec: WorkerRecord, reason: str) -> None:
        if rec.worker_id in self._replacing or self._closing:
            return
        group = self._group_of(rec)
        if group is not None:
            self._begin_replace_group(rec, group, reason)
            return
        log.error("worker %s failed (%s): replacing it", rec.worker_id, reason)
        rec.last_failure = reason
        self.router.mark_unhealthy(rec.worker_id)
        self._replacing[rec.worker_id] = asyncio.create_task(
            self._replace(rec, reason), name=f"replace-{rec.worker_id}"
        )

    async def _replace(self, rec: WorkerRecord, reason: str) -> None:
        wid = rec.worker_id
        try:
            # its requests fail over now (or wait for this replacement); the registry drops it
            await self.router.worker_lost(wid, reason)
            await self.store.deregister(wid)
            while not self._closing:
                self._kill_ranks(rec)  # it may be hung rather than dead; a TP worker: every rank
                rec.followers = self._spawn_followers(wid, rec.pool)
                actor = self._spawn(wid, rec.pool, rec.followers)
                handle = _handle(wid, rec.pool, actor)
                rec.actor, rec.handle = actor, handle  # so shutdown kills this incarnation
                try:
                    address, node_id = await self._ready_ranks(rec)  # a TP worker: its new group too
                    break
                except Exception as e:
                    rec.last_failure = f"restart failed: {e}"
                    log.error("replacement of %s failed, retrying in %ss: %s", wid, self.options.restart_backoff_s, e)
                    await asyncio.sleep(self.options.restart_backoff_s)
            else:
                return
            rec.address, rec.node_id = address, node_id
            rec.restarts += 1
            rec.missed_pings = 0
            rec.started_at = time.time()
            self.router.add_worker(wid, handle, rec.role, address)  # a fresh, healthy entry
            self._check_shm_locality(strict=False)
            log.warning("worker %s replaced (restart %d) on node %s", wid, rec.restarts, node_id[:8])
        finally:
            self._replacing.pop(wid, None)

    def _group_of(self, rec: WorkerRecord) -> WorkerGroup | None:
        """The group ``rec`` lives and dies with: its attention group (a model worker or one of
        its attention workers), its EP pool's group, else None (replaced alone)."""
        plan = group_of(self.attention_groups, rec.worker_id)
        if plan is not None:
            return WorkerGroup(plan.name, self._records(plan), plan)
        if rec.pool.experts > 1:
            return WorkerGroup(_ep_group_name(rec.pool), self._members(rec.pool))
        return None

    def _begin_replace_group(self, failed: WorkerRecord, group: WorkerGroup, reason: str) -> None:
        """A group member failed: the group is broken for every member (see the module
        docstring); only its members are given up and replaced, other groups keep serving."""
        members = group.members
        log.error(
            "worker %s failed (%s): replacing its %s group %s %s",
            failed.worker_id,
            reason,
            group.kind,
            group.name,
            [r.worker_id for r in members],
        )
        failed.last_failure = reason
        for rec in members:
            if rec is not failed:
                rec.last_failure = f"{group.kind} peer {failed.worker_id} failed: {reason}"
            self.router.mark_unhealthy(rec.worker_id)
        task = asyncio.create_task(self._replace_group(group, reason), name=f"replace-{group.name}")
        for rec in members:
            self._replacing[rec.worker_id] = task

    async def _replace_group(self, group: WorkerGroup, reason: str) -> None:
        members = group.members
        try:
            for rec in members:  # their requests fail over now (or wait for the group)
                await self.router.worker_lost(rec.worker_id, f"{reason} (its {group.kind} group {group.name})")
                await self.store.deregister(rec.worker_id)
            while not self._closing:
                for rec in members:
                    ray.kill(rec.actor, no_restart=True)  # the living ones hold a broken group
                    rec.actor = self._spawn(rec.worker_id, rec.pool)
                    rec.handle = _handle(rec.worker_id, rec.pool, rec.actor)
                try:
                    ready = await asyncio.gather(*(self._wait_ready(r.handle, r.pool) for r in members))
                    if group.attention is not None:
                        await self._form_attention_group(group.attention)
                    else:
                        await self._form_ep_group(members[0].pool, members)
                    break
                except Exception as e:
                    for rec in members:
                        rec.last_failure = f"group restart failed: {e}"
                    log.error(
                        "restart of %s group %s failed, retrying in %ss: %s",
                        group.kind,
                        group.name,
                        self.options.restart_backoff_s,
                        e,
                    )
                    await asyncio.sleep(self.options.restart_backoff_s)
            else:
                return
            for rec, (address, node_id) in zip(members, ready, strict=True):
                rec.address, rec.node_id = address, node_id
                rec.restarts += 1
                rec.missed_pings = 0
                rec.started_at = time.time()
                if rec.role != ATTENTION_ROLE:
                    self.router.add_worker(rec.worker_id, rec.handle, rec.role, address)
            self._check_shm_locality(strict=False)
            log.warning("%s group %s replaced", group.kind, group.name)
        finally:
            for rec in members:
                self._replacing.pop(rec.worker_id, None)

    async def wait_replaced(self, worker_id: str, timeout: float | None = None) -> None:
        """Until ``worker_id`` is not being replaced (for tests and operators)."""
        task = self._replacing.get(worker_id)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)

    # ------------------------------------------------------------ placement checks
    def _check_shm_locality(self, strict: bool) -> None:
        """shm moves KV through /dev/shm: every prefill and decode worker (and attention worker,
        whose receivers take the prefill workers' KV) must share a node."""
        if self.config.transfer.kind != "shm":
            return
        nodes = {r.node_id for r in self.workers.values() if r.node_id is not None}
        roles = {r.role for r in self.workers.values()}
        if len(nodes) <= 1 or "prefill" not in roles:
            return
        msg = (
            f"transfer.kind 'shm' is node-local but the workers run on {len(nodes)} nodes; "
            "use 'grpc' or 'torch', or pin all pools to one node with custom resources"
        )
        if strict:
            raise RuntimeError(msg)
        log.error("%s", msg)

    def _warn_if_short_of_resources(self) -> None:
        need: dict[str, float] = {}
        for p in self.config.pools:
            for key, amount in {"CPU": p.num_cpus, "GPU": p.num_gpus, **p.resources}.items():
                need[key] = need.get(key, 0.0) + amount * p.num_workers * p.tensor_parallel
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if v > 0 and have.get(k, 0.0) < v}
        if short:
            self._progress(
                f"warning: the pools need {_fmt_resources(need)} but the cluster has {_fmt_resources(have)}; "
                "actors stay pending until the resources appear (e.g. an autoscaler adds nodes)"
            )


def _handle(wid: str, pool: PoolConfig, actor: Any) -> PrefillHandle | DecodeHandle | AttentionHandle:
    invoker = RayInvoker(wid, actor)
    if pool.role == ATTENTION_ROLE:
        return AttentionHandle(wid, invoker)
    return PrefillHandle(wid, invoker) if pool.role == "prefill" else DecodeHandle(wid, invoker)


def _ep_group_name(pool: PoolConfig) -> str:
    return f"ep/{pool.name}"


def _pool_request(p: PoolConfig) -> str:
    return _fmt_resources({"CPU": p.num_cpus, "GPU": p.num_gpus, **p.resources})


def _pool_summary(p: PoolConfig) -> str:
    if p.tensor_parallel > 1:
        return f"{p.name} ({p.role}) x{p.num_workers} of {p.tensor_parallel} TP ranks [{_pool_request(p)} per rank]"
    return f"{p.name} ({p.role}) x{p.num_workers} [{_pool_request(p)} each]"


def _fmt_resources(res: dict[str, float]) -> str:
    shown = {k: v for k, v in sorted(res.items()) if v and not k.startswith(("node:", "memory", "object_store"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"
