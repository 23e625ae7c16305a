"""AttentionAPI: what the control plane calls on an attention worker (attention_offload/worker.py;
its Ray shell attention_offload/actor.py implements the same methods).

An attention worker is not routed to: the controller builds it, forms the attention group
[model worker = rank 0, attention workers 1..N] through ``node_ip`` / ``free_port`` /
``join_group`` (cluster/control/groups.py ``form_group``, every rank at once), reads its
``stats`` for GetServerInfo, and ``shutdown``s it with its model worker (a group is replaced
as one, never reused).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from engine.runtime.api import GroupMemberAPI

STATES = ("waiting", "serving", "closed", "failed")


@dataclass(frozen=True)
class AttentionWorkerStats:
    worker_id: str
    state: str  # one of STATES: waiting (no group yet) -> serving -> closed (CLOSE) | failed
    # its shard index at the model worker (group rank - 1; None before joining). The shard keeps
    # no block accounting: which pages are free is the model worker's engine's (its
    # AttentionOffloadReport.used_blocks[shard]; ClusterInfo.attention_free_blocks)
    shard: int | None
    total_blocks: int  # pages of every layer it holds
    live_contexts: int  # batch contexts begun and not ended (0 between steps)
    batches: int  # non-empty batch contexts served
    served: int  # messages served by a finished loop (0 while serving)
    error: str | None  # why the loop failed ("failed" only)
    # its KV receiver (prefill workers push prompts' KV straight into it, shard_kv.py): the
    # address they connect to (None: built without one) and the page bytes written so far
    kv_address: object = None
    kv_bytes_received: int = 0


class AttentionAPI(GroupMemberAPI):
    """``join_group`` (GroupMemberAPI): the attention group as rank >= 1, then serve."""

    @abc.abstractmethod
    def ping(self) -> str:
        """The worker id, once the worker is built (the readiness probe). Raises EngineStopped
        once its serve loop failed (the controller then replaces its group)."""

    @abc.abstractmethod
    def stats(self) -> AttentionWorkerStats: ...

    @abc.abstractmethod
    def node_id(self) -> str:
        """The Ray node the worker runs on ("local" in process)."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...
