"""DecodeWorker: receives prefilled requests' K/V, then generates with continuous batching.

Wraps an EngineCore in ``decode_only`` mode and a KVReceiver writing into its cache. A
transferred request goes through:

    start_transfer(spec)   reserve blocks (queued FIFO while the pool is full), then
                           ``receiver.expect(rid, blocks)``; a stream is opened for it
    set_first_token(rid)   the prefill worker's sampled token (router forwards it)
    receiver DONE + first token known -> ``engine.admit``: the request decodes
    receiver FAILED, transfer timeout, abort -> blocks freed, stream failed with the reason

Short prompts skip all that: ``generate_local(spec)`` prefills here (no transfer).
Callers read tokens with ``read(rid, cursor, timeout)`` (each token once, in order).
Blocks are freed on completion, abort, timeout and failure: ``stats()`` shows the pool.

Failover continuations (``emitted``, see decode_worker.api) are built by ``_new_request`` as
the request they continue: prompt + emitted output, the stop-string checker fed the emitted
tokens, placeholder logprobs for them (the stream's logprobs stay aligned with its tokens;
readers start past them). A transferred continuation receives the KV of prompt + emitted;
``engine.admit`` recomputes the emitted positions once more (it counts only the prompt as
computed), which costs that many tokens of one step and changes nothing else.

Expert parallelism (``dispatcher``: an EPDispatcher, the engine built by
``expert_router.group.build_ep_engine`` for this worker's rank): the worker is one rank of an
EP group. Its loop does not step until ``join_group`` connected the dispatcher; from then on
it steps through a ``LockstepStepper`` (every iteration is one group round, so a rank without
requests still serves its experts while any rank has work). The group lives and dies as one:
a peer that dies fails this rank's next collective within the group's timeout (the loop
crashes, every stream fails with "engine failed", the router fails its requests over), and a
group stopped by another rank's shutdown stops this rank's loop too (EngineStopped).

Attention offload (``attention``: an OffloadedEngine over a DistAttentionTransport built
unconnected; ``engine`` is its core): the worker is the model worker, rank 0 of an attention
group [model worker, attention workers 1..N] (cluster.control forms it). Its loop does not
step until ``join_group`` connected the transport; from then on every idle tick runs
``attention.keepalive()`` (pings at a quarter of the group's timeout, so the attention
workers' receives never time out while idle). A dead attention worker fails the step's
receive within the group's timeout (CommunicationError: the loop crashes, every stream fails
with "engine failed", never a wrong token); ``shutdown`` sends CLOSE to the attention workers.
Transferred requests of a model worker (a prefill pool beside the attention pool): its
receiver is an AttentionKVReceiver (decode_worker/attention_receiver.py) and the KV goes
straight to an attention worker. ``start_transfer`` places the request on a shard at once
(``_place``: the shard with the most free blocks net of the transfers already queued for
it), returns that attention worker's KV address (the router hands it to the prefill worker)
and reserves the blocks in that shard's sub-pool (queued FIFO per shard while it is full:
the KV may already be on its way there, so the request cannot move to another shard).

Bound: ``_active`` holds every request accepted and not yet finished or aborted; at
``max_pending`` of them a new one is refused with queue.Full.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass

from attention_offload.dist_transport import DistAttentionTransport, query_kv_addresses
from attention_offload.offloaded import OffloadedEngine
from decode_worker.api import KV_TRANSFER_FAILED, KV_TRANSFER_TIMED_OUT, DecodeAPI
from decode_worker.attention_receiver import AttentionKVReceiver
from engine.config import SchedulerMode
from engine.engine import EngineCore
from engine.parallel import CommunicationError, Communicator, DeferredCommunicator
from engine.request import Request
from engine.runtime.continuation import replay_emitted
from engine.runtime.groups import GroupSpec, free_port, join_communicator, join_deferred
from engine.runtime.stats import (
    QUEUE_SECONDS_BUCKETS,
    TRANSFER_SECONDS_BUCKETS,
    CumulativeHistogram,
    speculation_report,
)
from engine.runtime.worker import RuntimeWorker, WorkerRuntime
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.types import (
    AttentionOffloadReport,
    FirstToken,
    KVAddress,
    RequestSpec,
    StreamChunk,
    WorkerStats,
)
from expert_router.dispatcher import EPDispatcher
from expert_router.member import EPMember
from kv_transfer.base import KVReceiver, TransferStatus

log = logging.getLogger(__name__)


@dataclass
class _Incoming:
    req: Request
    deadline: float
    reserved: bool = False
    first: FirstToken | None = None  # the prefill's result, once the router forwards it
    partition: int | None = None  # an attention model worker's: the shard its KV is sent to


class DecodeWorker(RuntimeWorker, DecodeAPI):
    def __init__(
        self,
        engine: EngineCore,
        receiver: KVReceiver | None,
        tokenizer: Tokenizer | None = None,
        worker_id: str = "decode-0",
        transfer_timeout_s: float = 60.0,
        role: str = "decode",
        max_pending: int = 512,
        dispatcher: EPDispatcher | None = None,
        node_ip: str = "127.0.0.1",
        attention: OffloadedEngine | None = None,
        tp_comm: DeferredCommunicator | None = None,
    ):
        """``attention``: this worker is a model worker over attention workers (module
        docstring); ``engine`` must be ``attention.core``. ``dispatcher``: this worker is that EP rank (see the module docstring). ``node_ip``:
        the address EP peers reach this worker's node at (the actor passes its Ray node IP).
        ``tp_comm``: this worker is rank 0 of a tensor-parallel worker on Ray (``engine`` a
        TPLeaderEngine over rank 0's shard built on it); ``join_group`` connects it."""
        if engine.config.scheduler.mode != SchedulerMode.DECODE_ONLY:
            raise ValueError("DecodeWorker needs an engine in decode_only mode")
        self.engine = engine
        self.receiver = receiver
        self.tokenizer = tokenizer
        self.role = role  # "decode", or "mixed" for a mixed pool's worker (reported in stats)
        self.transfer_timeout_s = transfer_timeout_s
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._active: set[str] = set()  # accepted, not finished or aborted (loop thread)
        self._incoming: dict[str, _Incoming] = {}
        self._reserve_queue: deque[str] = deque()  # ids waiting for blocks, FIFO
        self._reserving = False  # inside _reserve_waiting (loop thread)
        self.transfer_failures = 0  # metrics: stats() totals restart from 0 with the worker
        # metrics (loop thread only): arrival -> first scheduled of local prefills (short
        # prompts, mixed role), and start_transfer -> KV blocks reserved (admission queue)
        self.queue_seconds = CumulativeHistogram(QUEUE_SECONDS_BUCKETS)
        self.reserve_wait_seconds = CumulativeHistogram(QUEUE_SECONDS_BUCKETS)
        self.handoff_seconds = CumulativeHistogram(TRANSFER_SECONDS_BUCKETS)
        # admitted transferred requests not yet decoded once -> their prefill's end (wall clock)
        self._handoff_from: dict[str, float] = {}
        self._unscheduled: dict[str, Request] = {}  # local prefills not scheduled yet
        self._node_ip = node_ip
        self._comms: list[Communicator] = []  # the groups joined (join_group); closed at shutdown
        if attention is not None and (attention.core is not engine or dispatcher is not None):
            raise ValueError("an attention-offloaded worker's engine is attention.core, and it is not an EP rank")
        if attention is not None and not isinstance(attention.transport, DistAttentionTransport):
            raise ValueError(
                "an attention-offloaded worker's transport is a DistAttentionTransport (connected at join)"
            )
        if attention is not None and receiver is not None and not isinstance(receiver, AttentionKVReceiver):
            raise ValueError("an attention-offloaded worker's receiver is an AttentionKVReceiver (its KV is remote)")
        self.attention = attention
        self.tp_comm = tp_comm
        self._attn_step_seconds = 0.0  # engine steps' wall time (attention offload report)
        self._attn_transport = None if attention is None else attention.transport  # a DistAttentionTransport
        self.ep = None if dispatcher is None else EPMember(worker_id, dispatcher, self._step, engine.has_work)
        if self.ep is not None:
            self.runtime = WorkerRuntime(
                engine, worker_id, self.ep.step, self._tick, self._compute_stats, has_work=self.ep.has_work
            )
        else:
            self.runtime = WorkerRuntime(
                engine,
                worker_id,
                self._step,
                self._tick,
                self._compute_stats,
                has_work=self._attention_has_work if attention is not None else None,
            )
        if receiver is not None:  # a finished transfer is admitted at once, not on the next idle poll
            receiver.on_terminal = self.runtime.loop.wake

    # ------------------------------------------------------------ called from any thread
    def kv_address(self) -> KVAddress:
        return None if self.receiver is None else self.receiver.address

    def start_transfer(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> KVAddress | None:
        if self.receiver is None:
            raise RuntimeError(f"{self.worker_id} has no KV receiver")
        return self.loop.run(lambda: self._start_transfer(spec, emitted))

    def set_first_token(self, request_id: str, first: FirstToken) -> None:
        self.loop.run(lambda: self._set_first_token(request_id, first))

    def generate_local(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> None:
        self.loop.run(lambda: self._generate_local(spec, emitted))

    def read(self, request_id: str, cursor: int = 0, timeout: float | None = 1.0) -> StreamChunk:
        chunk = self.runtime.streams.get(request_id).read(cursor, timeout)
        if chunk.finished:
            self.runtime.streams.close(request_id)
        return chunk

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        self.loop.run(lambda: self._abort(request_id, reason))

    def set_speculation_pressure(self, pressure: float) -> None:
        self.engine.set_cluster_pressure(pressure)  # one float, read by the policy each step

    def node_ip(self) -> str:
        return self._node_ip

    def free_port(self) -> int:
        return free_port(self._node_ip)

    def join_group(self, spec: GroupSpec) -> None:
        if self.tp_comm is not None:  # rank 0 of tp/<worker id>; routed only once joined
            join_deferred(self.tp_comm, spec)
            self.loop.wake()
            return
        if self.attention is not None:
            self._join_attention_group(spec)
            return
        if self.ep is None:
            raise ValueError(f"{self.worker_id} is not an expert-parallel worker: it joins no group")
        self.ep.join(spec)
        self.loop.wake()

    def _join_attention_group(self, spec: GroupSpec) -> None:
        assert self.attention is not None and isinstance(self._attn_transport, DistAttentionTransport)
        transport = self._attn_transport
        if spec.rank != 0 or spec.world_size != transport.num_shards + 1:
            raise ValueError(
                f"{self.worker_id} is the model worker (rank 0) of {transport.num_shards} attention workers, "
                f"asked to join as rank {spec.rank} of {spec.world_size}"
            )
        comm = join_communicator(spec)
        self._comms.append(comm)
        self.attention.keepalive_s = spec.timeout_s / 4
        if isinstance(self.receiver, AttentionKVReceiver):  # before connect: the loop does not use comm yet
            self.receiver.set_addresses(query_kv_addresses(comm, transport.ranks))
        transport.connect(comm)  # the loop starts stepping from here
        self.loop.wake()

    def _attention_has_work(self) -> bool:
        assert isinstance(self._attn_transport, DistAttentionTransport)
        return self._attn_transport.connected and self.engine.has_work()

    def shutdown(self) -> None:
        if self.ep is not None:
            self.ep.stop(lambda: self.loop.error)
        self.runtime.stop()
        if isinstance(self._attn_transport, DistAttentionTransport) and self._attn_transport.connected:
            try:  # the loop has stopped: this thread may use the transport now
                self._attn_transport.close()  # CLOSE: the attention workers' loops return
            except CommunicationError as e:  # an attention worker already gone: nothing to close
                log.warning("%s: closing the attention group: %s", self.worker_id, e)
        if self.receiver is not None:
            self.receiver.close()
        for comm in (*self._comms, *([self.tp_comm] if self.tp_comm is not None else [])):
            comm.close()  # the loop is stopped and the group's last op done
        if self.ep is not None:
            self.ep.close()

    # ------------------------------------------------------------ loop thread only
    def _new_request(self, spec: RequestSpec, emitted: tuple[int, ...]) -> Request:
        if len(self._active) >= self.max_pending:
            raise queue.Full(f"{self.worker_id} holds {len(self._active)} requests, its bound (max_pending)")
        req = self.engine.prepare(spec.to_request())
        if self.tokenizer is not None and spec.params.stop:
            req.stop_checker = IncrementalDetokenizer(self.tokenizer, spec.params.stop)
        replay_emitted(req, emitted)
        stream = self.runtime.streams.open(spec.request_id)  # ValueError for a duplicate id
        if req.is_finished:  # the emitted tokens already ended it: nothing to compute
            stream.publish(req)
        else:
            self._active.add(spec.request_id)
        return req

    def _start_transfer(self, spec: RequestSpec, emitted: tuple[int, ...]) -> KVAddress | None:
        """-> where the prefill worker sends the KV: None = this worker's ``kv_address()``, or
        (an attention model worker) the address of the attention worker it is placed on."""
        if isinstance(self.receiver, AttentionKVReceiver):
            self.receiver.check_ready()  # before the request holds anything here
        req = self._new_request(spec, emitted)
        if req.is_finished:
            return None
        inc = _Incoming(req, time.monotonic() + self.transfer_timeout_s)
        address = None
        if isinstance(self.receiver, AttentionKVReceiver):
            inc.partition = self._place(req)
            address = self.receiver.address_of(inc.partition)
        self._incoming[req.request_id] = inc
        self._reserve_queue.append(req.request_id)
        self._reserve_waiting()
        return address

    def _place(self, req: Request) -> int:
        """An attention model worker's shard for a transferred request: the most free blocks
        net of the transfers queued for each shard (ties: the lowest index)."""
        assert self.attention is not None
        bs = self.engine.config.cache.block_size
        room = [n - used for n, used in zip(self.attention.capacity, self.attention.used_blocks(), strict=True)]
        for rid in self._reserve_queue:
            inc = self._incoming.get(rid)
            if inc is not None and inc.partition is not None:
                room[inc.partition] -= -(-inc.req.num_tokens // bs)
        return max(range(len(room)), key=lambda s: (room[s], -s))

    def _reserve_waiting(self) -> None:
        """Reserve blocks for queued transfers in arrival order. A request that does not fit
        blocks the ones behind it in its partition (all of them without partitions): FIFO per
        pool, so a large request is never starved by smaller ones. Not reentrant: an abort
        inside (a request that can never fit) held no blocks, so there is nothing new to try."""
        if self._reserving:
            return
        self._reserving = True
        try:
            self._reserve_in_order()
        finally:
            self._reserving = False

    def _reserve_in_order(self) -> None:
        blocked: set[int | None] = set()
        waiting: deque[str] = deque()
        while self._reserve_queue:
            rid = self._reserve_queue.popleft()
            inc = self._incoming.get(rid)
            if inc is None:  # aborted while queued
                continue
            if inc.partition in blocked:
                waiting.append(rid)
                continue
            try:
                if inc.partition is None:
                    blocks = self.engine.reserve(inc.req)
                else:
                    blocks = self.engine.reserve(inc.req, inc.partition)
            except ValueError as e:  # it can never fit this pool: fail it, not the loop
                self._abort(rid, f"cannot reserve KV blocks: {e}")
                continue
            if blocks is None:
                blocked.add(inc.partition)
                waiting.append(rid)
                continue
            inc.reserved = True
            self.reserve_wait_seconds.observe(max(0.0, time.monotonic() - inc.req.arrival_time))
            self.receiver.expect(rid, blocks)
        self._reserve_queue = waiting

    def _set_first_token(self, rid: str, first: FirstToken) -> None:
        inc = self._incoming.get(rid)
        if inc is not None:
            inc.first = first

    def _generate_local(self, spec: RequestSpec, emitted: tuple[int, ...]) -> None:
        req = self._new_request(spec, emitted)
        if req.is_finished:
            return
        try:
            self.engine.add_request(req)
        except ValueError:
            self.runtime.streams.close(req.request_id)
            self._active.discard(req.request_id)
            raise
        self._unscheduled[req.request_id] = req

    def _tick(self) -> None:
        if self.attention is not None and isinstance(self._attn_transport, DistAttentionTransport):
            if self._attn_transport.connected:
                self.attention.keepalive()
        self._reserve_waiting()
        now = time.monotonic()
        reserved = [rid for rid, inc in self._incoming.items() if inc.reserved]
        states = self.receiver.poll_many(reserved) if reserved else {}
        for rid, inc in list(self._incoming.items()):
            st = states.get(rid, TransferStatus.BOOTSTRAPPING)
            if st == TransferStatus.DONE and inc.first is not None:
                del self._incoming[rid]
                self.receiver.cancel(rid)  # forget the finished transfer's bookkeeping
                if inc.first.logprobs is not None:
                    inc.req.logprobs.append(inc.first.logprobs)
                inc.req.num_cached_tokens = inc.first.num_cached_tokens  # the prefill's prefix hits
                req = self.engine.admit(rid, inc.first.token_id)
                if inc.first.prefilled_at is not None and not req.is_finished:  # it will decode
                    self._handoff_from[rid] = inc.first.prefilled_at
                self._publish(req)
            elif st == TransferStatus.FAILED:
                self.transfer_failures += 1
                self._abort(rid, f"{KV_TRANSFER_FAILED}: {self.receiver.error(rid)}")
            elif now > inc.deadline:
                self.transfer_failures += 1
                self._abort(rid, f"{KV_TRANSFER_TIMED_OUT} after {self.transfer_timeout_s}s ({st.value})")

    def _step(self) -> None:
        t0 = time.monotonic()  # step() schedules first: requests it picks up were scheduled now
        wall0 = time.time()
        result = self.engine.step()
        if self.attention is not None:
            self._attn_step_seconds += time.monotonic() - t0
        if self._handoff_from:
            for req in result.outputs:  # decoded in this step; the first time for those listed
                if (prefilled_at := self._handoff_from.pop(req.request_id, None)) is not None:
                    self.handoff_seconds.observe(max(0.0, wall0 - prefilled_at))
        for rid, req in list(self._unscheduled.items()):
            if req.num_cached_tokens >= 0 or req.is_finished:  # set when first scheduled
                del self._unscheduled[rid]
                if req.num_cached_tokens >= 0:
                    self.queue_seconds.observe(max(0.0, t0 - req.arrival_time))
        for req in result.outputs:
            self._publish(req)
        self.runtime.snapshot.refresh()

    def _publish(self, req: Request) -> None:
        if req.is_finished:
            self._active.discard(req.request_id)
        stream = self.runtime.streams.find(req.request_id)
        if stream is not None:
            stream.publish(req)

    def _abort(self, rid: str, reason: str) -> None:
        self._active.discard(rid)
        self._handoff_from.pop(rid, None)
        self._unscheduled.pop(rid, None)
        inc = self._incoming.pop(rid, None)
        if inc is not None and inc.reserved:
            self.receiver.cancel(rid)
        self.engine.abort(rid)
        stream = self.runtime.streams.find(rid)
        if stream is not None:
            stream.fail(reason)
            if reason == "aborted":  # the caller cancelled: nobody will read the stream
                self.runtime.streams.close(rid)
        if reason != "aborted":
            log.error("%s: request %s failed: %s", self.worker_id, rid, reason)
        self._reserve_waiting()  # freed blocks go to the oldest queued transfer at once

    def _compute_stats(self) -> WorkerStats:
        engine = self.engine.stats()
        return WorkerStats(
            worker_id=self.worker_id,
            role=self.role,
            started_at=self.runtime.started_at,
            stale=False,
            engine=engine,
            pending_requests=engine.waiting_requests + engine.running_requests + len(self._incoming),
            transfers_in_flight=len(self._incoming),
            transfer_failures=self.transfer_failures,
            transfer_bytes=None,
            transfer_seconds=None,
            queue_seconds=self.queue_seconds.report(),
            reserve_wait_seconds=self.reserve_wait_seconds.report(),
            handoff_seconds=self.handoff_seconds.report(),
            speculation=speculation_report(self.engine),
            cached_block_hashes=self.engine.cached_block_hashes(),
            expert_parallel=None if self.ep is None else self.ep.report(),
            attention=self._attention_report(),
        )

    def _attention_report(self) -> AttentionOffloadReport | None:
        a = self.attention
        if a is None or not isinstance(self._attn_transport, DistAttentionTransport):
            return None
        c, mc = self._attn_transport.counters, self.engine.config.model
        row_bytes = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * self.engine.layout.torch_dtype.itemsize
        return AttentionOffloadReport(
            attention_workers=self._attn_transport.num_shards,
            connected=self._attn_transport.connected,
            used_blocks=tuple(a.used_blocks()),
            total_blocks=tuple(a.capacity),
            tokens=c.payload_out // row_bytes,
            payload_bytes=c.payload_out + c.payload_in,
            control_bytes=c.control,
            wait_seconds=c.wait_seconds,
            step_seconds=self._attn_step_seconds,
        )
