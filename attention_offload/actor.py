"""AttentionActor: the Ray shell over an AttentionWorker (the worker itself knows nothing of Ray).

Lifecycle: ``__init__`` pins torch's intra-op threads to the actor's Ray CPU share and builds
the worker (its shard's pages are allocated here; the first ``ping`` returns once that is
done: the readiness probe) -> the controller forms the attention group through ``node_ip`` /
``free_port`` / ``join_group`` (the model worker is rank 0) -> the worker serves its shard on
its own thread -> ``shutdown``; the owner then kills the actor.

Threading: a threaded actor; ``join_group`` blocks until every rank joined, so it runs in
the default group while ``ping``/``stats``/``node_ip``/``free_port`` answer from "control".
"""

from __future__ import annotations

from typing import Any

import ray

from attention_offload.api import AttentionAPI, AttentionWorkerStats
from attention_offload.shard_kv import ShardReceiverFactory
from attention_offload.worker import AttentionWorker, build_attention_worker
from engine.runtime.groups import GroupSpec
from engine.runtime.threads import set_threads_for_cpu_share

CONTROL_GROUP = "control"


@ray.remote(max_concurrency=4, concurrency_groups={CONTROL_GROUP: 2})
class AttentionActor(AttentionAPI):
    def __init__(
        self,
        model: str,
        engine_options: dict[str, Any] | None = None,
        worker_id: str = "attention-0",
        receiver_factory: ShardReceiverFactory | None = None,
    ):
        """``receiver_factory`` (kv_transfer.ReceiverFactory, pickled by Ray): the worker's KV
        receiver, listening on this node's Ray IP for network kinds."""
        self.num_threads = set_threads_for_cpu_share(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
        self.worker: AttentionWorker = build_attention_worker(
            model,
            engine_options,
            worker_id=worker_id,
            node_ip=ray.util.get_node_ip_address(),
            receiver_factory=receiver_factory,
        )

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> str:
        return self.worker.worker_id

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> AttentionWorkerStats:
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

    def join_group(self, spec: GroupSpec) -> None:
        self.worker.join_group(spec)  # blocks until every rank joined: not in the control group

    def shutdown(self) -> None:
        self.worker.shutdown()
