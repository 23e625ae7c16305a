"""PrefillWorker: computes prompts and streams their K/V to decode workers layer by layer.

Wraps an EngineCore in ``prefill_only`` mode (constructor injection; no Ray here: see
actor.py for the shell). Per request:

    prefill(spec, decode_address)      caller blocks until the first token is known
      -> engine computes the prompt in chunks; after each layer of each step the pages that
         chunk touched are pushed (layer-wise), or, with ``layerwise=False``, every layer's
         pages are pushed once the prompt is done
      -> PREFILLED: first token returned to the caller; ``sender.finish(rid, n_chunks)``
      -> sender DONE / FAILED / timeout: ``engine.release`` frees the blocks here.

Pages go by reference (``sender.send_blocks``: the shm transport lets the decode worker copy
them straight out of this cache, which ``kv_cache_shared`` puts in shared memory) whenever
they stay unchanged until the sender reports DONE: every full page, and every page of the
prompt's final chunk. The one page that changes later, the partially filled last page of a
non-final chunk (the next chunk appends to it), goes by copy (``sender.send``); the next
chunk re-sends it, so every page is complete on the receiver once the stream finishes. A
prefix-cache hit sends the cached pages with the first computed chunk.

Pinning: every block sent by reference takes one extra pool reference (``_Outgoing.pinned``)
held until the transfer settles (sender DONE / FAILED / transfer timeout), so a preempted
request's blocks are not reused while the receiver may still read them. An abort unpins at
once: the receiver may then read reused bytes for the aborted request only, which fail its
checksum (loudly) and are never admitted.

Failover continuations (``emitted``, see prefill_worker.api) are prefilled as the request they
continue: prompt + emitted output (stop-string checker fed the emitted tokens, placeholder
logprobs for them), so the KV sent covers prompt + emitted and ``prefill`` returns the next
token alone (read from the stream at ``len(emitted)``).

Expert parallelism (``dispatcher``: the EPDispatcher of an engine built by
``expert_router.group.build_ep_engine`` for this worker's rank; ``splitserve serve
--prefill-experts N``): the worker is one rank of an EP group of prefill workers, attention data
parallel (its own prompts), 1/N of every MoE layer's routed experts. Its loop does not step
until ``join_group`` joined the group; from then on every iteration is one group round
(expert_router/member.EPMember), so a rank without prompts still serves its experts while any
rank prefills. The group lives and dies as one, as the decode worker's (see there).

Bound: at ``max_pending`` requests being prefilled (``_out``) a new one is refused with
queue.Full; requests whose KV is settling are bounded by the transfer timeout.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import SchedulerMode
from engine.engine import EngineCore
from engine.kv_cache.layout import KVLayoutMismatch
from engine.parallel import DeferredCommunicator
from engine.request import Request, RequestStatus
from engine.runtime.continuation import replay_emitted
from engine.runtime.groups import GroupSpec, free_port, join_deferred
from engine.runtime.stats import QUEUE_SECONDS_BUCKETS, TRANSFER_SECONDS_BUCKETS, CumulativeHistogram
from engine.runtime.streams import OutputStream
from engine.runtime.worker import RuntimeWorker, WorkerRuntime
from engine.scheduler.output import ScheduledRequest, SchedulerOutput
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.types import KV_TRANSFER_FAILED, KVAddress, PeerUnreachable, RequestSpec, StreamChunk, WorkerStats
from expert_router.dispatcher import EPDispatcher
from expert_router.member import EPMember
from kv_transfer.base import KVLinkBroken, KVSender, TransferStatus
from prefill_worker.api import PrefillAPI

log = logging.getLogger(__name__)

# A send to a receiver that went away: the transports raise KVLinkBroken, a socket error may
# surface as is. Other KVTransferErrors (finish twice, a chunk too big for the arena) are bugs
# or configuration errors: they stop the engine loop loudly instead of failing one request.
LINK_ERRORS = (KVLinkBroken, OSError)


@dataclass
class _Outgoing:
    sender: KVSender
    req: Request
    chunks: int = 0  # chunks sent so far
    next_page: int = 0  # first page not yet sent complete
    deadline: float = 0.0  # set once PREFILLED: release blocks by then whatever the sender says
    first_sent: float | None = None  # monotonic time of the first chunk queued (metrics)
    nbytes: int = 0  # payload bytes queued so far (metrics)
    queued: bool = True  # not yet scheduled once (metrics: queue time)
    # set when a send to its receiver failed (the link broke): nothing more is sent, and the
    # request alone fails after the step (its blocks freed, its stream failed with this)
    failed: str | None = None
    # blocks sent by reference, each holding one extra pool reference until the transfer settles
    pinned: dict[int, None] = field(default_factory=dict)


class PrefillWorker(RuntimeWorker, PrefillAPI):
    def __init__(
        self,
        engine: EngineCore,
        sender_factory: Callable[[], KVSender],
        tokenizer: Tokenizer | None = None,
        layerwise: bool = True,
        worker_id: str = "prefill-0",
        transfer_timeout_s: float = 60.0,
        max_pending: int = 512,
        node_ip: str = "127.0.0.1",
        tp_comm: DeferredCommunicator | None = None,
        dispatcher: EPDispatcher | None = None,
    ):
        """``tp_comm``: this worker is rank 0 of a tensor-parallel worker on Ray (``engine`` a
        TPLeaderEngine over a shard built on it); ``join_group`` connects it, and the loop
        steps only from then on. ``dispatcher``: this worker is that EP rank (module docstring)."""
        if engine.config.scheduler.mode != SchedulerMode.PREFILL_ONLY:
            raise ValueError("PrefillWorker needs an engine in prefill_only mode")
        self.engine = engine
        self.layerwise = layerwise
        self.tokenizer = tokenizer
        self.transfer_timeout_s = transfer_timeout_s
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._sender_factory = sender_factory
        self._senders: dict[KVAddress, KVSender] = {}  # decode address -> connected sender
        self._out: dict[str, _Outgoing] = {}
        self._releasing: dict[str, _Outgoing] = {}  # PREFILLED, waiting for the sender
        # metrics, reported by stats(); totals restart from 0 with the worker (started_at tells)
        self.transfer_failures = 0
        self.transfer_bytes = 0  # payload bytes of transfers that ended DONE
        self.transfer_seconds = CumulativeHistogram(TRANSFER_SECONDS_BUCKETS)  # first chunk -> sender DONE
        self.queue_seconds = CumulativeHistogram(QUEUE_SECONDS_BUCKETS)  # arrival -> first scheduled
        self._node_ip = node_ip
        self.tp_comm = tp_comm
        if tp_comm is not None and dispatcher is not None:
            raise ValueError("a tensor-parallel prefill worker is not an EP rank")
        self.ep = None if dispatcher is None else EPMember(worker_id, dispatcher, self._step, engine.has_work)
        if self.ep is not None:
            step, has_work = self.ep.step, self.ep.has_work
        else:
            step = self._step
            has_work = None if tp_comm is None else (lambda: tp_comm.connected and engine.has_work())
        self.runtime = WorkerRuntime(engine, worker_id, step, self._tick, self._compute_stats, has_work=has_work)

    # ------------------------------------------------------------ called from any thread
    def prefill(
        self, spec: RequestSpec, decode_address: KVAddress, timeout: float | None = None, emitted: tuple[int, ...] = ()
    ) -> StreamChunk:
        stream = self.loop.run(lambda: self._add(spec, decode_address, emitted))
        return stream.read(len(emitted), timeout)

    def abort(self, request_id: str) -> None:
        self.loop.run(lambda: self._abort(request_id))

    def node_ip(self) -> str:
        return self._node_ip

    def free_port(self) -> int:
        return free_port(self._node_ip)

    def join_group(self, spec: GroupSpec) -> None:
        if self.ep is not None:
            self.ep.join(spec)
        elif self.tp_comm is not None:
            join_deferred(self.tp_comm, spec)  # raises for another rank or size than the shard's
        else:
            raise ValueError(f"{self.worker_id} is neither an EP rank nor rank 0 of a tensor-parallel worker")
        self.loop.wake()

    def shutdown(self) -> None:
        if self.ep is not None:
            self.ep.stop(lambda: self.loop.error)
        self.runtime.stop()
        for s in self._senders.values():
            s.close()
        if self.tp_comm is not None:  # the loop is stopped: its last collective is done
            self.tp_comm.close()
        if self.ep is not None:
            self.ep.close()

    # ------------------------------------------------------------ loop thread only
    def _add(self, spec: RequestSpec, decode_address: KVAddress, emitted: tuple[int, ...]) -> OutputStream:
        if len(self._out) >= self.max_pending:
            raise queue.Full(f"{self.worker_id} is prefilling {len(self._out)} requests, its bound (max_pending)")
        req = self.engine.prepare(spec.to_request())
        if self.tokenizer is not None and spec.params.stop:
            req.stop_checker = IncrementalDetokenizer(self.tokenizer, spec.params.stop)
        replay_emitted(req, emitted)
        if req.is_finished:  # the emitted tokens already ended it: nothing to prefill or send
            stream = self.runtime.streams.open(req.request_id)
            self.runtime.streams.close(req.request_id)
            stream.publish(req)
            return stream
        sender = self._sender_to(decode_address)  # before the engine holds any block for it
        self.engine.add_request(req)  # raises ValueError for a bad request
        self._out[req.request_id] = _Outgoing(sender, req)
        return self.runtime.streams.open(req.request_id)

    def _sender_to(self, decode_address: KVAddress) -> KVSender:
        """The open link to ``decode_address``, connected now if there is none (or its
        receiver went away). A receiver that cannot be reached raises PeerUnreachable; one
        whose KV layout differs raises KVLayoutMismatch (a configuration error, not a fault)."""
        sender = self._senders.get(decode_address)
        if sender is not None and sender.link_error is not None:
            self._drop_sender(decode_address)  # its receiver is gone (restarted?): reconnect
            sender = None
        if sender is None:
            sender = self._sender_factory()
            try:
                sender.connect(decode_address)
            except (KVLayoutMismatch, TypeError, AttributeError):  # configuration or programming errors
                sender.close()
                raise
            except Exception as e:
                sender.close()
                raise PeerUnreachable(
                    f"{self.worker_id}: no KV link to {decode_address}: {type(e).__name__}: {e}"
                ) from e
            self._senders[decode_address] = sender
        return sender

    def _push_layer(self, layer: int, out: SchedulerOutput) -> None:
        bs = self.engine.layout.block_size
        for sr in out.scheduled:
            o = self._out.get(sr.request_id)
            if o is None or o.failed is not None:
                continue
            try:
                self._push_request_layer(layer, sr, o, bs)
            except LINK_ERRORS as e:  # this request's receiver is gone; the step goes on
                o.failed = f"{KV_TRANSFER_FAILED}: {type(e).__name__}: {e}"

    def _push_request_layer(self, layer: int, sr: ScheduledRequest, o: _Outgoing, bs: int) -> None:
        """Send what layer ``layer`` of this step made final of request ``sr`` (see _push_layer)."""
        end = sr.start_pos + sr.num_tokens  # tokens in the cache once this step is done
        last = (end - 1) // bs
        first = min(o.next_page, sr.start_pos // bs)
        # pages [first, fixed) never change again; a partial last page of a non-final
        # chunk does (the next chunk appends to it): copy it now
        fixed = last + 1 if sr.sample or end % bs == 0 else last
        if fixed > first:
            self._send_fixed(o, sr.request_id, layer, first, sr.block_ids[first:fixed])
        if fixed <= last:
            self._send_copy(o, sr.request_id, layer, last, sr.block_ids[last : last + 1])
        if layer == self.engine.layout.num_layers - 1:
            o.next_page = end // bs

    def _push_all(self, rid: str, o: _Outgoing) -> None:
        blocks = self.engine.block_ids(rid)  # the prompt is done: none of them changes again
        for layer in range(self.engine.layout.num_layers):
            self._send_fixed(o, rid, layer, 0, blocks)

    def _send_fixed(self, o: _Outgoing, rid: str, layer: int, first: int, blocks: list[int]) -> None:
        """Queue pages ``blocks`` of ``layer`` (pages ``first..`` of the request), which stay
        unchanged until the transfer settles, as one chunk: by reference, the blocks pinned."""
        self._sent(o, len(blocks))
        self._pin(o, blocks)
        o.sender.send_blocks(rid, layer, first, self.engine.cache, blocks)
        o.chunks += 1

    def _send_copy(self, o: _Outgoing, rid: str, layer: int, first: int, blocks: list[int]) -> None:
        """Queue a copy of pages ``blocks`` of ``layer`` (a page the next chunk still changes)."""
        self._sent(o, len(blocks))
        o.sender.send(rid, layer, first, self.engine.cache.kv[layer, blocks])  # advanced index: a copy
        o.chunks += 1

    def _pin(self, o: _Outgoing, blocks: list[int]) -> None:
        new = [b for b in blocks if b not in o.pinned]
        self.engine.pin(new)
        o.pinned.update(dict.fromkeys(new))

    def _unpin(self, o: _Outgoing) -> None:
        self.engine.unpin(list(reversed(o.pinned)))
        o.pinned.clear()

    def _sent(self, o: _Outgoing, num_pages: int) -> None:
        if o.first_sent is None:
            o.first_sent = time.monotonic()
        o.nbytes += num_pages * o.sender.layout.page_bytes  # the pages on the wire

    def _step(self) -> None:
        hook = self._push_layer if self.layerwise else None
        t0 = time.monotonic()  # step() schedules first: requests it picks up were scheduled now
        result = self.engine.step(hook)
        for o in self._out.values():
            if o.queued and o.req.num_cached_tokens >= 0:  # set when first scheduled
                o.queued = False
                self.queue_seconds.observe(max(0.0, t0 - o.req.arrival_time))
        for rid in result.preempted:
            if (o := self._out.get(rid)) is not None:
                o.next_page = 0  # its blocks were freed: the recompute resends from the start
        for req in result.outputs:
            rid = req.request_id
            o = self._out.get(rid)
            if o is None or o.failed is not None:
                continue
            try:
                if req.status == RequestStatus.PREFILLED and not self.layerwise:
                    self._push_all(rid, o)
                o.sender.finish(rid, o.chunks)
            except LINK_ERRORS as e:
                o.failed = f"{KV_TRANSFER_FAILED}: {type(e).__name__}: {e}"
                continue
            del self._out[rid]
            stream = self.runtime.streams.close(rid)
            if req.status == RequestStatus.PREFILLED:
                o.deadline = time.monotonic() + self.transfer_timeout_s
                self._releasing[rid] = o
                stream.prefilled_at = time.time()  # the hand-off starts (decode worker's clock too)
            else:  # ended without a first token (e.g. aborted by the engine): nothing to wait for
                self._unpin(o)
            stream.publish(req)
        for rid, o, error in [(rid, o, o.failed) for rid, o in self._out.items() if o.failed is not None]:
            self._fail_transfer(rid, o, error)
        self.runtime.snapshot.refresh()

    def _fail_transfer(self, rid: str, o: _Outgoing, error: str) -> None:
        """The request's link broke: it alone ends, its blocks freed and its stream failed with
        a KV-transfer error (the router places it again); other requests are untouched."""
        del self._out[rid]
        if o.req.status == RequestStatus.PREFILLED:
            self.engine.release(rid)
        else:
            self.engine.abort(rid)
        self._unpin(o)
        self.transfer_failures += 1
        log.warning("request %s: %s", rid, error)
        stream = self.runtime.streams.close(rid)
        if stream is not None:
            stream.fail(error)

    def _drop_sender(self, address: KVAddress) -> None:
        sender = self._senders.pop(address)
        log.warning("closing the KV sender to %s: %s", address, sender.link_error)
        sender.close()

    def _tick(self) -> None:
        now = time.monotonic()
        # a sender whose receiver died (a replaced decode worker listens elsewhere) is closed
        # once no request still polls it: nothing would ever use that address again
        for address, sender in list(self._senders.items()):
            if sender.link_error is not None and not any(
                o.sender is sender for o in (*self._out.values(), *self._releasing.values())
            ):
                self._drop_sender(address)
        for rid, o in list(self._releasing.items()):
            st = o.sender.poll(rid)
            if st in (TransferStatus.DONE, TransferStatus.FAILED) or now > o.deadline:
                if st == TransferStatus.DONE:
                    self.transfer_bytes += o.nbytes
                    self.transfer_seconds.observe(now - (o.first_sent if o.first_sent is not None else now))
                else:
                    self.transfer_failures += 1
                    log.error("KV transfer of %s ended %s: %s", rid, st.value, o.sender.error(rid))
                del self._releasing[rid]
                self.engine.release(rid)
                self._unpin(o)

    def _abort(self, rid: str) -> None:
        o = self._out.pop(rid, None)
        if (settling := self._releasing.pop(rid, None)) is not None:
            o = settling
            self.engine.release(rid)
        else:
            self.engine.abort(rid)
        if o is not None:
            self._unpin(o)
        stream = self.runtime.streams.close(rid)
        if stream is not None:
            stream.fail("aborted")

    def _compute_stats(self) -> WorkerStats:
        return WorkerStats(
            worker_id=self.worker_id,
            role="prefill",
            started_at=self.runtime.started_at,
            stale=False,
            engine=self.engine.stats(),
            pending_requests=len(self._out),
            transfers_in_flight=len(self._releasing),
            transfer_failures=self.transfer_failures,
            transfer_bytes=self.transfer_bytes,
            transfer_seconds=self.transfer_seconds.report(),
            queue_seconds=self.queue_seconds.report(),
            reserve_wait_seconds=None,
            handoff_seconds=None,
            speculation=None,  # the prompt is prefilled here; speculation runs where tokens are decoded
            cached_block_hashes=self.engine.cached_block_hashes(),
            expert_parallel=None if self.ep is None else self.ep.report(),
        )
