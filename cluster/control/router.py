"""Router: places each request on workers, streams its tokens back, and keeps it alive when a
worker fails (cluster/control/failover.py).

Per request (``generate``) a RequestLedger (cluster/control/ledger.py) holds what it emitted
so far; each placement ("attempt") continues it from there:

    route  RoutingPolicy on the load snapshot, for the context so far (prompt + emitted); the
           prefix policy reads the PrefixIndex (hashed exactly as the engine's prefix cache)
    SPLIT: decode.start_transfer(spec, emitted) -> prefill.prefill(spec, emitted) returns the
           next token (yielded at once) -> decode.set_first_token -> decode.read from cursor
           len(emitted) + 1 until finished. The two first calls overlap (the KV goes to the
           decode worker's kv_address), except for a decode worker without one (an attention
           model worker): its start_transfer returns the request's KV address (the attention
           worker it is placed on), which the prefill then sends to
    local: decode.generate_local(spec, emitted) -> decode.read from len(emitted)

A placement fails (AttemptFailed: a worker unavailable or declared lost, a KV transfer that
failed its checksum or broke, a worker at its bound); the request is placed again, up to
``FailoverConfig.max_retries`` times, with every token emitted so far re-prefilled on the new
workers, and the caller's stream goes on: no token twice, none missing (the ledger's cursor
spans placements). With no worker to go to (the only decode worker died) a failed-over
request waits up to ``wait_for_worker_s`` for one (its replacement). Past the retries: before
any token reached the caller, NoWorkerAvailable (safe to retry); after, a last chunk with
finish_reason "abort" and an error naming the attempts. A caller that stops iterating
(cancel, disconnect) aborts the request on its workers, which frees its KV blocks.

Journal: every token goes to the state store before it is yielded (write-ahead), so a client's
cursor never runs ahead of the journal; ``follow`` lets a Resume read a live request by
cursor. After a store outage the live requests' journals are rewritten (``_resync``), and so
are those that ended during it (at most ``UNSYNCED_MAX``), so a finished request is never
mistaken for one in flight and generated again.

Bounds: a new request goes only to workers below ``max_inflight_per_worker`` requests placed
by this router (WorkersBusy when none is); failed-over requests are exempt (they were
accepted already); each worker also refuses past its own ``max_pending`` (queue.Full).

Load snapshots: the router counts its own in-flight requests and prompt tokens per worker
(exact, updated per request) and takes KV block counts from periodic ``stats()`` polls, whose
cached prefix hashes also feed the PrefixIndex. ``limits`` (set once every worker reported
its ``limits()``) is what the frontend validates requests against: the strictest of all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from cluster.config import FailoverConfig
from cluster.control.errors import one_line
from cluster.control.failover import AttemptFailed, FailoverStats, FailureCause, classify_stream_error
from cluster.control.handles import DecodeHandle, PrefillHandle, WorkerUnavailable
from cluster.control.ledger import RequestLedger
from cluster.control.routing import NoWorkerAvailable, RouteDecision, RoutingPolicy, WorkerLoad, WorkersBusy
from cluster.control.state import (
    CANCELLED,
    InMemoryStateStore,
    JournalEnd,
    JournalRecord,
    RouteRecord,
    StateStore,
)
from cluster.control.state.prefix_index import PrefixIndex
from engine.kv_cache.manager import prefix_block_hashes
from engine.types import (
    FirstToken,
    KVAddress,
    PeerUnreachable,
    RequestSpec,
    StreamChunk,
    UnknownRequest,
    WorkerLimits,
    WorkerStats,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

UNSYNCED_MAX = 10_000  # ledgers that ended during a store outage, kept to be journaled after it
WAIT_POLL_S = 0.5  # a waiting failover re-checks the workers at least this often
PRESSURE_STEP = 0.05  # speculation pressure changes smaller than this are not sent


class RequestInFlight(ValueError):
    """``generate`` named a request id or journal key that is in flight in this router."""


@dataclass
class WorkerEntry:
    handle: PrefillHandle | DecodeHandle  # PrefillHandle for role "prefill", else DecodeHandle
    role: str  # configured pool role
    # KV receiver address (decode-capable workers); None for a decode-capable worker: per
    # request, returned by its start_transfer (an attention model worker, DecodeAPI.kv_address)
    address: KVAddress | None = None
    healthy: bool = True
    inflight: int = 0  # requests the router has placed here and not seen finish
    prompt_tokens: int = 0  # prompt tokens placed here whose prefill has not returned
    stats: WorkerStats | None = None  # last stats() report; None until the first poll
    pressure_sent: float | None = None  # speculation pressure last sent to it (None: never)

    @property
    def worker_id(self) -> str:
        return self.handle.worker_id

    @property
    def decode(self) -> DecodeHandle:
        assert isinstance(self.handle, DecodeHandle), f"{self.handle.worker_id} is not decode-capable"
        return self.handle

    @property
    def prefill(self) -> PrefillHandle:
        assert isinstance(self.handle, PrefillHandle), f"{self.handle.worker_id} is not a prefill worker"
        return self.handle


@dataclass(eq=False)  # compared and hashed by identity (the router keeps a set of them)
class Attempt:
    """One placement of a request. ``depends``: the workers it waits on now (prefill and
    decode until the first token, then decode alone); ``lost`` resolves to (worker id,
    reason) when the controller declares one of them lost."""

    number: int
    worker_rid: str  # the request's id on the workers of this placement
    decision: RouteDecision
    decode: WorkerEntry
    prefill: WorkerEntry | None
    lost: asyncio.Future
    depends: set[str] = field(default_factory=set)
    finished: bool = False  # the workers ended the request themselves (nothing to abort)


class Router:
    def __init__(
        self,
        policy: RoutingPolicy,
        read_timeout_s: float = 1.0,
        failover: FailoverConfig | None = None,
        store: StateStore | None = None,
    ):
        self.policy = policy
        self.workers: dict[str, WorkerEntry] = {}
        self.read_timeout_s = read_timeout_s
        self.failover = failover or FailoverConfig()
        self.store = store if store is not None else InMemoryStateStore()
        self.requests: dict[str, RequestLedger] = {}  # in flight, by the router's request id
        self.by_key: dict[str, RequestLedger] = {}  # in flight, by journal key
        self.limits: WorkerLimits | None = None  # the strictest of every worker's limits()
        self.prefix_index = PrefixIndex()
        self.stats = FailoverStats()
        self._attempts: set[Attempt] = set()  # placements in progress (worker_lost scans them)
        self._unsynced: deque[RequestLedger] = deque(maxlen=UNSYNCED_MAX)
        self._changed: asyncio.Event | None = None  # set when a worker joins or turns healthy
        self._seq = itertools.count(1)
        self.store.on_reconnect(self._resync)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the prefix index the store kept (a restarted router routes by prefix before
        the first stats poll). A store that cannot be read now leaves it empty."""
        from cluster.control.state import StoreUnavailable

        try:
            saved = await self.store.prefix_load()
        except StoreUnavailable as e:
            log.warning("prefix index not loaded (%s): it refills from the workers' stats", e)
            return
        for wid, hashes in saved.items():
            self.prefix_index.replace(wid, hashes)

    # ------------------------------------------------------------ membership and load
    def add_worker(
        self, worker_id: str, handle: PrefillHandle | DecodeHandle, role: str, address: KVAddress | None = None
    ) -> None:
        want = PrefillHandle if role == "prefill" else DecodeHandle
        if not isinstance(handle, want):
            raise TypeError(f"worker {worker_id} of role {role!r} needs a {want.__name__}, got {type(handle).__name__}")
        self.workers[worker_id] = WorkerEntry(handle, role, address)
        self._signal_change()

    async def collect_limits(self) -> WorkerLimits:
        """Ask every worker for its limits and keep the strictest (``self.limits``)."""
        reports = await asyncio.gather(*(w.handle.limits() for w in self.workers.values()))
        if not reports:
            raise NoWorkerAvailable("no workers registered")
        limits = reports[0]
        for other in reports[1:]:
            limits = limits.combine(other)
        self.limits = limits
        return limits

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def mark_unhealthy(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None and w.healthy:
            log.warning("worker %s marked unhealthy", worker_id)
            w.healthy = False

    def mark_healthy(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None and not w.healthy:
            log.info("worker %s healthy again", worker_id)
            w.healthy = True
            self._signal_change()

    async def worker_lost(self, worker_id: str, reason: str) -> None:
        """The controller (the liveness authority) gave ``worker_id`` up: dead, hung, or being
        replaced. It leaves routing and the prefix index, and every placement waiting on it
        fails over now instead of waiting for a call to time out."""
        self.mark_unhealthy(worker_id)
        for attempt in list(self._attempts):
            if worker_id in attempt.depends and not attempt.lost.done():
                attempt.lost.set_result((worker_id, reason))
        if worker_id in self.prefix_index.workers():
            self.prefix_index.drop(worker_id)
        await self.store.prefix_drop(worker_id)

    def _signal_change(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def refresh_loads(self) -> None:
        """Poll every worker's stats(); a worker that does not answer is marked unhealthy.
        Each report's cached prefix hashes replace the worker's entry in the prefix index
        (written through to the state store when they changed)."""

        async def one(wid: str, w: WorkerEntry) -> None:
            try:
                w.stats = await asyncio.wait_for(w.handle.stats(), timeout=5.0)
            except (WorkerUnavailable, TimeoutError) as e:
                if w.healthy:  # said once; the controller decides what happens to it
                    log.warning("stats poll of %s failed: %s", wid, one_line(e))
                self.mark_unhealthy(wid)
                return
            if self.prefix_index.replace(wid, w.stats.cached_block_hashes):
                await self.store.prefix_replace(wid, w.stats.cached_block_hashes)

        await asyncio.gather(*(one(wid, w) for wid, w in list(self.workers.items())))
        await self._feed_speculation_pressure()

    def speculation_pressure(self) -> float:
        """Queueing at the decoding workers (decode and mixed), from their last reports:
        requests waiting (for a batch slot or for their KV) per request running, 0 when
        nothing waits. SmartSpec counts each second of speculative work as (1 + pressure)
        seconds, so speculation backs off before the queues build."""
        waiting = running = 0
        for w in self.workers.values():
            if w.role in ("decode", "mixed") and w.healthy and w.stats is not None:
                waiting += w.stats.engine.waiting_requests + w.stats.transfers_in_flight
                running += w.stats.engine.running_requests
        return waiting / max(running, 1)

    async def _feed_speculation_pressure(self) -> None:
        """Send the pressure to each speculating worker whose last value differs by more than
        PRESSURE_STEP (a worker that does not speculate reports ``speculation`` None)."""
        pressure = self.speculation_pressure()

        async def one(w: WorkerEntry) -> None:
            try:
                await asyncio.wait_for(w.decode.set_speculation_pressure(pressure), timeout=5.0)
                w.pressure_sent = pressure
            except (WorkerUnavailable, TimeoutError) as e:
                log.debug("pressure update of %s failed: %s", w.worker_id, one_line(e))

        targets = [
            w
            for w in self.workers.values()
            if isinstance(w.handle, DecodeHandle)
            and w.healthy
            and w.stats is not None
            and w.stats.speculation is not None
            and (w.pressure_sent is None or abs(w.pressure_sent - pressure) > PRESSURE_STEP)
        ]
        await asyncio.gather(*(one(w) for w in targets))

    def snapshot(self, bounded: bool = True) -> list[WorkerLoad]:
        """The routing policy's view: the router's own exact counts, the last stats() report
        for KV room, the prefix index for cached prefixes. A worker not polled yet reports no
        KV room. ``bounded``: workers at ``max_inflight_per_worker`` are not accepting."""
        cap = self.failover.max_inflight_per_worker
        loads = []
        for wid, w in self.workers.items():
            st = w.stats
            loads.append(
                WorkerLoad(
                    worker_id=wid,
                    role=w.role,
                    healthy=w.healthy,
                    pending_requests=w.inflight,
                    pending_prompt_tokens=w.prompt_tokens,
                    running_requests=max(st.engine.running_requests if st else 0, w.inflight),
                    free_kv_blocks=st.engine.free_kv_blocks if st else 0,
                    total_kv_blocks=st.engine.total_kv_blocks if st else 0,
                    cached_prefix_hashes=self.prefix_index.hashes_of(wid),
                    accepting=not bounded or w.inflight < cap,
                )
            )
        return loads

    def prefix_hashes(self, prompt_token_ids: list[int]) -> list[int]:
        """Hashes of the prompt's full blocks, as every worker's prefix cache computes them
        (empty before the workers reported their block size)."""
        if self.limits is None:
            return []
        return prefix_block_hashes(prompt_token_ids, self.limits.block_size)

    # ------------------------------------------------------------ requests
    def live(self, key: str) -> RequestLedger | None:
        """The in-flight request journaled under ``key`` in this router, if any."""
        return self.by_key.get(key)

    async def generate(
        self,
        spec: RequestSpec,
        *,
        key: str | None = None,
        origin: str = "router",
        resume: JournalRecord | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream a request's output; the last chunk has ``finished=True``.

        ``key``: the journal key clients resume by (default: ``spec.request_id``). ``resume``:
        the journal of a request whose process died or whose caller cancelled it; it continues
        after its tokens (which are not yielded again). Raises ValueError for an invalid request, RequestInFlight for an id
        or key in flight,
        NoWorkerAvailable when nothing can serve, WorkersBusy at the in-flight bounds.
        """
        rid = spec.request_id
        key = key or rid
        if rid in self.requests:
            raise RequestInFlight(f"request id {rid!r} is already in flight")
        existing = self.by_key.get(key)
        if existing is not None and not existing.finished:  # a finished one is on its way out
            raise RequestInFlight(f"request {key!r} is already in flight")
        ledger = RequestLedger(key, spec, origin, resume)
        self.requests[rid] = ledger
        self.by_key[key] = ledger
        try:
            if resume is None:
                await self.store.journal_start(ledger.journal_spec)
            elif resume.finished:  # it was cancelled: in flight again
                await self.store.journal_reopen(key)
            async for chunk in self._serve(ledger):
                yield chunk
        finally:
            # ended (and journaled so) before it leaves: a Resume that finds it meanwhile sees
            # how it ended, and a cancelled one may be continued under the same key at once
            try:
                if not ledger.finished:  # the caller stopped iterating, or an exception ends it
                    await self._end(ledger, JournalEnd("abort", CANCELLED, ledger.num_cached_tokens or 0))
            finally:  # even when a second cancellation lands in the journal write
                if self.requests.get(rid) is ledger:
                    del self.requests[rid]
                if self.by_key.get(key) is ledger:
                    del self.by_key[key]

    def follow(self, key: str, cursor: int) -> AsyncIterator[StreamChunk]:
        """A live request's chunks from ``cursor`` on (Resume of a request still running
        here). KeyError (now) when ``key`` is not in flight here; ValueError (at the first
        chunk) for a cursor past the tokens emitted so far."""
        return self.by_key[key].follow(cursor)

    async def _serve(self, ledger: RequestLedger) -> AsyncIterator[StreamChunk]:
        failures = 0
        last: AttemptFailed | None = None
        while True:
            try:
                attempt = await self._place(ledger, failover=last is not None or ledger.resumed, number=failures)
            except (NoWorkerAvailable, WorkersBusy) as e:
                if last is None and not ledger.resumed:
                    raise  # nothing was accepted yet: the caller's refusal
                cause = last.cause if last is not None else FailureCause.WORKER_LOST
                yield await self._give_up(ledger, failures, cause, f"no worker can continue it: {e}")
                return
            try:
                async for chunk in self._run(ledger, attempt):
                    out = await self._emit(ledger, chunk)
                    yield out
                    if out.finished:
                        return
                raise AssertionError(f"attempt {attempt.number} of {ledger.key} ended without a finished chunk")
            except AttemptFailed as f:
                failures += 1
                last = f
                ledger.failed_at = time.monotonic()
                ledger.last_cause = f.cause.value
                self.stats.failover(f.cause)
                if f.cause in (FailureCause.WORKER_LOST,):
                    self.mark_unhealthy(f.worker_id)
                retry = failures <= self.failover.max_retries
                log.warning(
                    "request %s: %s (placement %d, %d tokens emitted): %s",
                    ledger.key,
                    f,
                    attempt.number + 1,
                    len(ledger.token_ids),
                    ("retrying with a fresh transfer" if f.cause is FailureCause.KV_CHECKSUM else "placing it again")
                    if retry
                    else f"giving up after {failures} failed placements",
                )
                if not retry:
                    yield await self._give_up(ledger, failures, f.cause, str(f))
                    return
            finally:
                await self._settle(attempt)

    async def _place(self, ledger: RequestLedger, failover: bool, number: int) -> Attempt:
        """Route the request's context so far. A first placement uses the in-flight bounds and
        fails at once; a failover ignores them and waits up to ``wait_for_worker_s`` for a
        worker (e.g. the replacement of the only decode worker)."""
        tokens = list(ledger.spec.prompt_token_ids) + ledger.token_ids
        hashes = self.prefix_hashes(tokens) if self.policy.uses_prefix_hashes else []
        deadline = time.monotonic() + (self.failover.wait_for_worker_s if failover else 0.0)
        waited = False
        while True:
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            try:
                decision = self.policy.route(len(tokens), self.snapshot(bounded=not failover), hashes, tokens)
                break
            except (NoWorkerAvailable, WorkersBusy):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                if not waited:
                    waited = True
                    self.stats.waits += 1
                    log.warning("request %s waits up to %.0fs for a worker to continue on", ledger.key, remaining)
                self.stats.waiting += 1
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, WAIT_POLL_S))
                except TimeoutError:
                    pass
                finally:
                    self.stats.waiting -= 1
        worker_rid = ledger.spec.request_id if number == 0 else f"{ledger.spec.request_id}#{next(self._seq)}"
        d = self.workers[decision.decode_worker]
        p = self.workers[decision.prefill_worker] if decision.prefill_worker else None
        attempt = Attempt(number, worker_rid, decision, d, p, asyncio.get_running_loop().create_future())
        attempt.depends = {d.worker_id} | ({p.worker_id} if p is not None else set())
        self._attempts.add(attempt)
        route = RouteRecord(
            len(ledger.routes), decision.prefill_worker, decision.decode_worker, decision.reason.value,
            len(ledger.token_ids), ledger.last_cause,
        )  # fmt: skip
        ledger.routes.append(route)
        await self.store.journal_route(ledger.key, route)
        return attempt

    async def _run(self, ledger: RequestLedger, attempt: Attempt) -> AsyncIterator[StreamChunk]:
        """The placement's new tokens (each chunk holds only tokens past the ledger's end).
        Raises AttemptFailed when it fails; the caller settles it (aborts on its workers)."""
        spec = RequestSpec(attempt.worker_rid, ledger.spec.prompt_token_ids, ledger.spec.params)
        emitted = tuple(ledger.token_ids)
        d, p = attempt.decode, attempt.prefill
        d.inflight += 1
        # a local prefill counts as pending prompt tokens on the decode worker until its first
        # token arrives, so token_jsq sees mixed workers' load
        local_tokens = 0 if p is not None else ledger.context_len
        d.prompt_tokens += local_tokens
        try:
            if p is None:
                await self._call(attempt, d.decode.generate_local(spec, emitted), d)
                cursor = len(emitted)
            else:
                first = await self._prefill(attempt, spec, emitted, d, p)
                attempt.depends = {d.worker_id}  # the prefill worker's part is done
                if first.error is not None:
                    raise AttemptFailed(classify_stream_error(first.error), p.worker_id, first.error)
                yield first  # the first token reaches the caller before the decode hand-off
                if first.finished:
                    return  # _settle aborts the reservation on the decode worker
                lp = first.logprobs[0] if first.logprobs else None
                ft = FirstToken(first.token_ids[0], lp, first.num_cached_tokens, first.prefilled_at)
                await self._call(attempt, d.decode.set_first_token(spec.request_id, ft), d)
                cursor = len(emitted) + 1
            while True:
                chunk = await self._call(attempt, d.decode.read(spec.request_id, cursor, self.read_timeout_s), d)
                if chunk.token_ids:
                    d.prompt_tokens -= local_tokens
                    local_tokens = 0
                if chunk.error is not None:
                    attempt.finished = True  # the worker ended it (and freed its blocks)
                    if chunk.token_ids:  # generated before the failure: valid, the caller gets them
                        yield StreamChunk(chunk.token_ids, chunk.logprobs, num_cached_tokens=chunk.num_cached_tokens)
                    raise AttemptFailed(classify_stream_error(chunk.error), d.worker_id, chunk.error)
                cursor += len(chunk.token_ids)
                if chunk.finished:
                    attempt.finished = True
                if chunk.token_ids or chunk.finished:
                    yield chunk
                if chunk.finished:
                    return
        finally:
            d.prompt_tokens -= local_tokens
            d.inflight -= 1

    async def _prefill(
        self, attempt: Attempt, spec: RequestSpec, emitted: tuple[int, ...], d: WorkerEntry, p: WorkerEntry
    ) -> StreamChunk:
        n = len(spec.prompt_token_ids) + len(emitted)
        p.inflight += 1
        p.prompt_tokens += n
        reserve: asyncio.Future[KVAddress | None] | None = None
        try:
            if d.address is None:
                # the KV address is per request (an attention model worker: the attention worker
                # the request is placed on receives its KV): the prefill waits for start_transfer
                address = await self._call(attempt, d.decode.start_transfer(spec, emitted), d)
                if address is None:
                    raise AttemptFailed(
                        FailureCause.STREAM_FAILED, d.worker_id, "start_transfer named no KV address for the request"
                    )
            else:
                # the decode worker reserves blocks while the prefill runs (its receiver buffers
                # any chunk that arrives first), so the reservation round trip is off the TTFT path
                address = d.address
                reserve = asyncio.ensure_future(self._call(attempt, d.decode.start_transfer(spec, emitted), d))
            first = await self._call(attempt, p.prefill.prefill(spec, address, None, emitted), p)
        except BaseException:
            if reserve is not None:
                await asyncio.gather(reserve, return_exceptions=True)  # settle before the caller aborts
            raise
        finally:
            p.inflight -= 1
            p.prompt_tokens -= n
        if reserve is not None:
            await reserve
        return first

    async def _call(self, attempt: Attempt, aw: Awaitable[T], worker: WorkerEntry) -> T:
        """Await one worker call of ``attempt``; raises AttemptFailed when it fails or when a
        worker the attempt depends on is declared lost first."""
        if attempt.lost.done():  # never talk to a worker the controller gave up on
            if asyncio.iscoroutine(aw):
                aw.close()
            elif isinstance(aw, asyncio.Future):
                aw.cancel()
            wid, reason = attempt.lost.result()
            raise AttemptFailed(FailureCause.WORKER_LOST, wid, f"declared lost by the controller: {reason}")
        fut = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({fut, attempt.lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        if not fut.done():
            fut.cancel()
            wid, reason = attempt.lost.result()
            raise AttemptFailed(FailureCause.WORKER_LOST, wid, f"declared lost by the controller: {reason}")
        try:
            return fut.result()
        except AttemptFailed:
            raise
        except WorkerUnavailable as e:
            raise AttemptFailed(FailureCause.WORKER_LOST, e.worker_id, str(e)) from e
        except queue.Full as e:
            raise AttemptFailed(FailureCause.WORKER_FULL, worker.worker_id, str(e) or "at its bound") from e
        except UnknownRequest as e:
            raise AttemptFailed(FailureCause.STREAM_FAILED, worker.worker_id, f"lost the request: {e}") from e
        except PeerUnreachable as e:
            # the prefill worker cannot reach the decode worker's KV receiver, which a live
            # decode worker always runs: it is gone (killed, not yet replaced)
            raise AttemptFailed(FailureCause.WORKER_LOST, attempt.decode.worker_id, str(e)) from e

    async def _settle(self, attempt: Attempt) -> None:
        """Unless its workers ended the request themselves, abort it there (frees KV blocks)."""
        self._attempts.discard(attempt)
        if attempt.finished:
            return
        for w in (attempt.prefill, attempt.decode):
            if w is None:
                continue
            try:
                await w.handle.abort(attempt.worker_rid)
            except Exception as e:  # the worker may be gone; its blocks went with it
                log.debug("abort of %s on %s: %s", attempt.worker_rid, w.worker_id, e)

    async def _emit(self, ledger: RequestLedger, chunk: StreamChunk) -> StreamChunk:
        """Journal ``chunk``'s tokens (write-ahead), append them to the ledger, and return the
        chunk the caller gets (its usage is the first prefill's prefix-cache hits)."""
        if ledger.num_cached_tokens is None and (chunk.token_ids or chunk.finished):
            ledger.num_cached_tokens = min(chunk.num_cached_tokens, len(ledger.spec.prompt_token_ids))
        if chunk.token_ids:
            cursor = ledger.stage(chunk.token_ids)
            await self.store.journal_tokens(ledger.key, cursor, chunk.token_ids)
            ledger.append(chunk.token_ids, chunk.logprobs)
            if ledger.failed_at is not None:
                self.stats.recovered(time.monotonic() - ledger.failed_at)
                ledger.failed_at = None
        cached = ledger.num_cached_tokens or 0
        if chunk.finished:
            await self._end(ledger, JournalEnd(chunk.finish_reason or "abort", chunk.error, cached))
        return StreamChunk(
            chunk.token_ids,
            chunk.logprobs,
            finished=chunk.finished,
            finish_reason=chunk.finish_reason,
            error=chunk.error,
            num_cached_tokens=cached,
        )

    async def _give_up(self, ledger: RequestLedger, failures: int, cause: FailureCause, why: str) -> StreamChunk:
        """The request's last chunk after its retries: an explicit error. When nothing reached
        the caller yet it is a refusal instead (raised: NoWorkerAvailable, or WorkersBusy when
        the workers were full), which is safe to retry."""
        self.stats.gave_up(cause)
        error = f"request {ledger.key} failed on {failures} placements: {why}"
        log.error("%s", error)
        await self._end(ledger, JournalEnd("abort", error, ledger.num_cached_tokens or 0))
        if not ledger.token_ids and not ledger.resumed:
            raise (WorkersBusy if cause is FailureCause.WORKER_FULL else NoWorkerAvailable)(error)
        return StreamChunk([], finished=True, finish_reason="abort", error=error, num_cached_tokens=0)

    async def _end(self, ledger: RequestLedger, end: JournalEnd) -> None:
        if ledger.finished:
            return
        ledger.finish(end)
        await self.store.journal_finish(ledger.key, end)
        if not self.store.health().ok:  # the store dropped it: journal it after the outage
            self._unsynced.append(ledger)

    async def _resync(self) -> None:
        """The store is back after an outage: rewrite every live request's journal, and those
        that ended during the outage, each as one write."""
        ledgers = [*self._unsynced, *self.by_key.values()]
        self._unsynced.clear()
        for ledger in ledgers:
            await self.store.journal_rewrite(ledger.record())
        if ledgers:
            log.info("state store back: rewrote %d request journals", len(ledgers))
