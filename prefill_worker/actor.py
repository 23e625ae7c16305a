"""PrefillActor: the Ray shell over a PrefillWorker (the worker itself knows nothing of Ray).

Lifecycle: ``__init__`` pins torch's intra-op threads to the actor's Ray CPU share, then
builds the worker (loads the model; the first ``ping`` returns once that is done, so callers
use it as the readiness probe) -> methods forward to the worker -> ``shutdown`` stops the
engine loop and closes the KV senders; the owner then kills the actor.

Threading: a threaded actor. ``prefill`` blocks a Ray thread until the request's first token,
so the default concurrency group needs as many threads as prefills in flight
(``max_concurrency``). ``ping``, ``stats``, ``limits`` and ``node_id`` run in their own small
"control" group so health checks are answered however many prefills are waiting.
"""

from __future__ import annotations

from typing import Any

import ray

from engine.runtime.groups import GroupSpec
from engine.runtime.threads import set_threads_for_cpu_share
from engine.runtime.tp_follower import FutureFollowerChannel, RemoteFollower
from engine.types import KVAddress, RequestSpec, StreamChunk, WorkerLimits, WorkerStats
from expert_router.group import EPRankOptions
from prefill_worker.api import PrefillAPI
from prefill_worker.build import build_prefill_worker

DEFAULT_MAX_CONCURRENCY = 64
CONTROL_GROUP = "control"


@ray.remote(max_concurrency=DEFAULT_MAX_CONCURRENCY, concurrency_groups={CONTROL_GROUP: 4})
class PrefillActor(PrefillAPI):
    def __init__(
        self,
        model: str,
        engine_options: dict[str, Any] | None = None,
        transport: str = "shm",
        transport_options: dict[str, Any] | None = None,
        worker_id: str = "prefill-0",
        layerwise: bool = True,
        transfer_timeout_s: float = 60.0,
        max_pending: int = 512,
        tp_followers: list[Any] | None = None,
        ep: EPRankOptions | None = None,
    ):
        """``tp_followers``: the TPFollowerActor handles (decode_worker/actor.py, built with
        mode "prefill_only") of ranks 1..N-1 when this actor is rank 0 of a TP prefill worker.
        ``ep``: this actor is that rank of an EP prefill pool (the controller forms the group)."""
        # torch threads = this actor's Ray CPU share
        self.num_threads = set_threads_for_cpu_share(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        followers = [
            RemoteFollower(f"{worker_id}/tp{r}", _follower_channel(h)) for r, h in enumerate(tp_followers or (), 1)
        ]
        self.worker = build_prefill_worker(
            model,
            engine_options,
            transport,
            transport_options,
            worker_id=worker_id,
            layerwise=layerwise,
            transfer_timeout_s=transfer_timeout_s,
            max_pending=max_pending,
            node_ip=ray.util.get_node_ip_address(),
            tp_followers=followers or None,
            ep=ep,
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
    def prefill(
        self, spec: RequestSpec, decode_address: KVAddress, timeout: float | None = None, emitted: tuple[int, ...] = ()
    ) -> StreamChunk:
        return self.worker.prefill(spec, decode_address, timeout, emitted)

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)

    def shutdown(self) -> None:
        self.worker.shutdown()


def _follower_channel(actor: Any) -> FutureFollowerChannel:
    """Rank 0's FollowerChannel to a TPFollowerActor: its submissions and checks as Ray calls,
    their ObjectRefs as futures (as decode_worker/actor.ray_follower_channel)."""
    return FutureFollowerChannel(
        lambda seq, call: actor.submit.remote(seq, call).future(), lambda: actor.check.remote().future()
    )
