"""AttentionWorker: one attention worker of an `attention` pool (plain class; Ray shell in actor.py).

It holds one AttentionShard (a share of the model worker's decode KV, every layer, pages
addressed by the model worker's block ids: no block pool of its own) and serves it to ONE
model worker over a torch.distributed group:

    build_attention_worker(model, engine_options)   the shard: layout from the model config,
                                                     ``num_blocks`` from the pool's engine options
                                                     (``num_blocks``, else ``max_kv_memory_gb``)
    node_ip() / free_port() / join_group(spec)      the GroupMember calls of
                                                     cluster.control.groups.form_group: the group is
                                                     [model worker = rank 0, attention workers 1..N];
                                                     join_group returns once joined and starts the
                                                     serve thread (``serve_shard`` until CLOSE)
    stats()                                          the shard's pages, contexts and serve state,
                                                     its KV receiver's address and bytes
    shutdown()                                       waits for the serve thread within the group's
                                                     timeout (the model worker's CLOSE ends it;
                                                     otherwise its next receive times out)

KV from prefill workers (``receiver_factory``, e.g. kv_transfer.ReceiverFactory): the worker
builds a KV receiver writing into its shard's cache and listening at once; prefill workers
push the prompts of requests placed on this shard straight into it, and the model worker
drives it (EXPECT / POLL / CANCEL between steps, shard_kv.py). Closed at ``shutdown``.

States: "waiting" (no group yet) -> "serving" -> "closed" (the model worker sent CLOSE) or
"failed" (the shard or the link raised: the error is kept in ``stats().error``; the group is
unusable and is replaced as one, never reused). Idle: the serve loop's receive is bounded by
the group's timeout, so the model worker pings between steps (OffloadedEngine.keepalive); an
attention worker whose model worker went silent fails with a CommunicationError after it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from attention_offload.api import AttentionAPI, AttentionWorkerStats
from attention_offload.build import build_shard, shard_layout
from attention_offload.dist_transport import serve_shard
from attention_offload.shard import AttentionShard
from attention_offload.shard_kv import ShardKV, ShardKVReceiver, ShardReceiverFactory
from engine.config import EngineConfig
from engine.kv_cache.paged_cache import PagedKVCache
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.parallel import Communicator
from engine.runtime.groups import GroupSpec, free_port, join_communicator
from engine.types import EngineStopped

log = logging.getLogger(__name__)

MODEL_RANK = 0  # the model worker's rank in the attention group; attention workers are 1..N


def attention_blocks(config: EngineConfig) -> int:
    """The shard's block count from an engine config: ``num_blocks``, else what
    ``max_kv_memory_gb`` holds of this model's KV (the engine's own sizing)."""
    if config.cache.num_blocks is not None:
        return config.cache.num_blocks
    return PagedKVCache.blocks_for_memory(shard_layout(config), config.cache.max_kv_memory_gb)


def attention_engine_config(model: str, engine_options: dict[str, Any] | None) -> EngineConfig:
    """The EngineConfig an attention pool's ``engine`` options describe (names validated by
    build_engine_config; ``mode``/``skip_tokenizer_init`` mean nothing here and are dropped)."""
    opts = {k: v for k, v in (engine_options or {}).items() if k not in ("mode", "skip_tokenizer_init")}
    return build_engine_config(resolve_model_path(model), **opts)


class AttentionWorker(AttentionAPI):
    def __init__(
        self,
        shard: AttentionShard,
        worker_id: str = "attention-0",
        node_ip: str = "127.0.0.1",
        receiver: ShardKVReceiver | None = None,
    ):
        """``receiver``: writes into ``shard.cache`` (module docstring); None: no prefill pool."""
        self.shard, self.worker_id, self._node_ip = shard, worker_id, node_ip
        self.kv = ShardKV(receiver, worker_id)
        self._state = "waiting"
        self._error: str | None = None
        self._served = 0
        self._thread: threading.Thread | None = None
        self._timeout_s = 0.0
        self._shard_index: int | None = None  # group rank - 1, once joined
        self._lock = threading.Lock()

    def ping(self) -> str:
        with self._lock:
            if self._state == "failed":
                raise EngineStopped(f"{self.worker_id}: attention shard loop failed: {self._error}")
        return self.worker_id

    def node_id(self) -> str:
        return "local"

    # ------------------------------------------------------------ GroupMember
    def node_ip(self) -> str:
        return self._node_ip

    def free_port(self) -> int:
        return free_port(self._node_ip)

    def join_group(self, spec: GroupSpec) -> None:
        """Join the attention group as rank >= 1 and start serving the model worker (rank 0)."""
        if spec.rank == MODEL_RANK:
            raise ValueError(f"{self.worker_id}: rank {MODEL_RANK} is the model worker's; attention workers are 1..N")
        if self._thread is not None:
            raise RuntimeError(f"{self.worker_id} already joined a group (state {self._state}); build a fresh worker")
        comm = join_communicator(spec)
        self._timeout_s = spec.timeout_s
        self._shard_index = spec.rank - 1
        self._state = "serving"
        self._thread = threading.Thread(target=self._serve, args=(comm,), name=f"{self.worker_id}-serve", daemon=True)
        self._thread.start()

    def _serve(self, comm: Communicator) -> None:
        try:
            served = serve_shard(comm, self.shard, MODEL_RANK, self.kv)
        except BaseException as e:  # noqa: BLE001 - kept and reported by stats(); the group is done
            log.error("%s: attention shard loop failed: %s: %s", self.worker_id, type(e).__name__, e)
            with self._lock:
                self._state, self._error = "failed", f"{type(e).__name__}: {e}"
            return
        finally:
            comm.close()  # the group is done either way (the model worker's CLOSE, or a failure)
        with self._lock:
            self._state, self._served = "closed", served

    # ------------------------------------------------------------ introspection
    def stats(self) -> AttentionWorkerStats:
        s = self.shard.stats()  # ints read from another thread: a snapshot, possibly mid-step
        with self._lock:
            return AttentionWorkerStats(
                self.worker_id,
                self._state,
                self._shard_index,
                s.total_blocks,
                s.live_contexts,
                s.batches,
                self._served,
                self._error,
                self.kv.address,
                self.kv.bytes_received,
            )

    def wait_stopped(self, timeout_s: float) -> bool:
        """Waits for the serve loop to end (CLOSE, or a failure) -> whether it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def shutdown(self) -> None:
        """The loop ends at the model worker's CLOSE or, without one, at its next receive's
        timeout; waits that long (+1 s), then leaves a stuck (daemon) thread behind loudly."""
        if not self.wait_stopped(self._timeout_s + 1.0):
            log.error("%s: serve loop still running %.0f s after shutdown", self.worker_id, self._timeout_s + 1.0)
        self.kv.close()  # its receiver stops listening (a stuck loop's EXPECTs fail from here on)


def build_attention_worker(
    model: str,
    engine_options: dict[str, Any] | None = None,
    worker_id: str = "attention-0",
    backend: str | None = None,
    node_ip: str = "127.0.0.1",
    receiver_factory: ShardReceiverFactory | None = None,
) -> AttentionWorker:
    """``backend``: the shard's attention backend; None: the pool's ``attention_backend``.
    ``receiver_factory``: the worker's KV receiver over its shard's cache (a network kind
    listens on ``node_ip``); None: none (no prefill pool)."""
    config = attention_engine_config(model, engine_options)
    kind = config.attention_backend if backend is None else backend
    shard = build_shard(config, attention_blocks(config), kind)
    receiver = None if receiver_factory is None else receiver_factory(shard.layout, shard.cache, node_ip)
    return AttentionWorker(shard, worker_id, node_ip, receiver)
