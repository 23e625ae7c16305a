"""DecodeActor: the Ray shell over a DecodeWorker (the worker itself knows nothing of Ray).

Lifecycle: ``__init__`` pins torch's intra-op threads to the actor's Ray CPU share, then
builds the worker (loads the model, starts the KV receiver; the first ``ping`` returns once
that is done, so callers use it as the readiness probe) -> methods forward to the worker ->
``shutdown`` stops the engine loop and closes the receiver; the owner then kills the actor.

The receiver's address is what prefill actors connect to. For the network transports
("grpc", "torch") it listens on this node's Ray IP unless ``transport_options`` names a
host, so prefill actors on other nodes can reach it; "shm" addresses are node-local paths.

Threading: a threaded actor. ``read`` blocks a Ray thread for up to its timeout, so the
default concurrency group needs about as many threads as requests streaming at once
(``max_concurrency``). ``ping``, ``stats``, ``limits``, ``kv_address`` and ``node_id`` run in
a small "control" group so health checks are answered however many reads are waiting.

Tensor-parallel followers (``TPFollowerActor``, the shell over engine/runtime/tp_follower's
TPFollowerWorker; ``ray_follower_channel``, rank 0's channel to one): the controller starts a
TP worker's follower actors first (``__init__`` pins torch's threads to the actor's CPU share
and loads the rank's shard; the first ``ping`` returns once that is done: the readiness
probe), then rank 0's DecodeActor with their handles, then forms the group ``tp/<worker id>``
over [rank 0, followers] (``node_ip`` / ``free_port`` / ``join_group``). From then on rank 0's
loop sends every engine call as ``submit(seq, call)``. On failure or shutdown the controller
kills every rank. A follower is a threaded actor: ``join_group`` blocks until every rank
joined and ``submit`` calls may overlap (hence their numbers), so they run in the default
group; ``submit`` only parks the call (the apply thread runs it) and returns at once.
``ping``, ``stats``, ``check`` and the group helpers answer from the "control" group while a
step runs.
"""

from __future__ import annotations

from typing import Any

import ray

from decode_worker.api import DecodeAPI
from decode_worker.build import build_decode_worker
from engine.runtime.groups import GroupSpec
from engine.runtime.threads import set_threads_for_cpu_share
from engine.runtime.tp_follower import (
    FutureFollowerChannel,
    RemoteFollower,
    TPFollowerAPI,
    TPFollowerStats,
    TPFollowerWorker,
    WireCall,
)
from engine.types import FirstToken, KVAddress, RequestSpec, StreamChunk, WorkerLimits, WorkerStats
from expert_router.group import EPRankOptions
from kv_transfer import NETWORK_KINDS

DEFAULT_MAX_CONCURRENCY = 64
CONTROL_GROUP = "control"


@ray.remote(max_concurrency=DEFAULT_MAX_CONCURRENCY, concurrency_groups={CONTROL_GROUP: 4})
class DecodeActor(DecodeAPI):
    def __init__(
        self,
        model: str,
        engine_options: dict[str, Any] | None = None,
        transport: str | None = "shm",
        transport_options: dict[str, Any] | None = None,
        worker_id: str = "decode-0",
        transfer_timeout_s: float = 60.0,
        role: str = "decode",
        max_pending: int = 512,
        ep: EPRankOptions | None = None,
        attention_blocks: list[int] | None = None,
        tp_followers: list[Any] | None = None,
    ):
        """``tp_followers``: the TPFollowerActor handles of ranks 1..N-1 when this actor is rank 0
        of a tensor-parallel worker (TPFollowerActor below)."""
        # torch threads = this actor's Ray CPU share
        self.num_threads = set_threads_for_cpu_share(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        opts = dict(transport_options or {})
        if transport in NETWORK_KINDS:  # receivers that listen on a ``host`` option
            opts.setdefault("host", ray.util.get_node_ip_address())
        self.worker = build_decode_worker(
            model,
            engine_options,
            transport,
            opts,
            worker_id=worker_id,
            transfer_timeout_s=transfer_timeout_s,
            role=role,
            max_pending=max_pending,
            ep=ep,
            node_ip=ray.util.get_node_ip_address(),
            attention_blocks=attention_blocks,
            tp_followers=[
                RemoteFollower(f"{worker_id}/tp{r}", ray_follower_channel(h))
                for r, h in enumerate(tp_followers or (), 1)
            ]
            or None,
        )

    # ------------------------------------------------------------ control group
    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> str:
        return self.worker.ping()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> WorkerStats:
        return self.worker.stats()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def limits(self) -> WorkerLimits:
        return self.worker.limits()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def kv_address(self) -> KVAddress:
        return self.worker.kv_address()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def node_ip(self) -> str:
        return self.worker.node_ip()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def free_port(self) -> int:
        return self.worker.free_port()

    def join_group(self, spec: GroupSpec) -> None:
        self.worker.join_group(spec)  # blocks until every rank joined: not in the control group

    # ------------------------------------------------------------ requests
    def start_transfer(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> KVAddress | None:
        return self.worker.start_transfer(spec, emitted)

    def set_first_token(self, request_id: str, first: FirstToken) -> None:
        self.worker.set_first_token(request_id, first)

    def generate_local(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> None:
        self.worker.generate_local(spec, emitted)

    def read(self, request_id: str, cursor: int = 0, timeout: float | None = 1.0) -> StreamChunk:
        return self.worker.read(request_id, cursor, timeout)

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        self.worker.abort(request_id, reason)

    def set_speculation_pressure(self, pressure: float) -> None:
        self.worker.set_speculation_pressure(pressure)

    def shutdown(self) -> None:
        self.worker.shutdown()


# ---------------------------------------------------------------- tensor-parallel follower ranks
@ray.remote(max_concurrency=4, concurrency_groups={CONTROL_GROUP: 2})
class TPFollowerActor(TPFollowerAPI):
    """A follower rank of a TP decode/mixed (``mode`` "decode_only") or prefill ("prefill_only")
    worker: the Ray shell of engine/runtime/tp_follower.TPFollowerWorker."""

    def __init__(
        self,
        model: str,
        engine_options: dict[str, Any] | None,
        rank: int,
        world_size: int,
        worker_id: str,
        mode: str = "decode_only",
    ):
        self.num_threads = set_threads_for_cpu_share(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        self.worker = TPFollowerWorker(
            model, engine_options, rank, world_size, worker_id, node_ip=ray.util.get_node_ip_address(), mode=mode
        )

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> str:
        return self.worker.ping()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> TPFollowerStats:
        return self.worker.stats()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def node_ip(self) -> str:
        return self.worker.node_ip()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def free_port(self) -> int:
        return self.worker.free_port()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def check(self) -> str | None:
        return self.worker.check()

    def join_group(self, spec: GroupSpec) -> None:
        self.worker.join_group(spec)  # blocks until every rank joined: not in the control group

    def submit(self, seq: int, call: WireCall) -> None:
        self.worker.submit(seq, call)

    def shutdown(self) -> None:
        self.worker.shutdown()


def ray_follower_channel(actor: Any) -> FutureFollowerChannel:
    """Rank 0's FollowerChannel to a TPFollowerActor (engine/runtime/tp_follower.py): its
    submissions and checks as Ray calls, their ObjectRefs as futures."""
    return FutureFollowerChannel(
        lambda seq, call: actor.submit.remote(seq, call).future(), lambda: actor.check.remote().future()
    )
