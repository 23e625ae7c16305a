"""Router: places each request on a prefill and a decode worker and streams its tokens back.

Per request (``generate``):
    route (RoutingPolicy on the current load snapshot; the prompt's full-block prefix hashes
           feed the "prefix" policy, hashed exactly as the engine's prefix cache does)
    SPLIT:  decode.start_transfer -> prefill.prefill (returns the first token, yielded at
            once) -> decode.set_first_token -> decode.read from cursor 1 until finished
    local:  decode.generate_local -> decode.read from cursor 0 until finished
Tokens reach the caller in order, each once (cursor reads). A worker that fails before the
first token is marked unhealthy and the request is re-routed (``max_retries``); after the
first token a failure ends the request with finish_reason "abort" and the error. A caller
that stops iterating (cancel, disconnect) aborts the request on both workers, which frees
its KV blocks.

Load snapshots: the router counts its own in-flight requests and prompt tokens per worker
(exact, updated per request) and takes KV block counts and cached prefix hashes from
periodic ``stats()`` polls. ``limits`` (set once every worker reported its ``limits()``)
is what the frontend validates requests against: the strictest of all workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.control.handles import DecodeHandle, PrefillHandle, WorkerUnavailable
from cluster.control.routing import NoWorkerAvailable, RouteDecision, RoutingPolicy, WorkerLoad
from engine.kv_cache.manager import prefix_block_hashes
from engine.types import FirstToken, KVAddress, RequestSpec, StreamChunk, WorkerLimits, WorkerStats

log = logging.getLogger(__name__)


@dataclass
class WorkerEntry:
    handle: PrefillHandle | DecodeHandle  # PrefillHandle for role "prefill", else DecodeHandle
    role: str  # configured pool role
    address: KVAddress | None = None  # KV receiver address (decode-capable workers)
    healthy: bool = True
    inflight: int = 0  # requests the router has placed here and not seen finish
    prompt_tokens: int = 0  # prompt tokens placed here whose prefill has not returned
    stats: WorkerStats | None = None  # last stats() report; None until the first poll

    @property
    def decode(self) -> DecodeHandle:
        assert isinstance(self.handle, DecodeHandle), f"{self.handle.worker_id} is not decode-capable"
        return self.handle

    @property
    def prefill(self) -> PrefillHandle:
        assert isinstance(self.handle, PrefillHandle), f"{self.handle.worker_id} is not a prefill worker"
        return self.handle


class Router:
    def __init__(self, policy: RoutingPolicy, read_timeout_s: float = 1.0, max_retries: int = 2):
        self.policy = policy
        self.workers: dict[str, WorkerEntry] = {}
        self.read_timeout_s = read_timeout_s
        self.max_retries = max_retries
        self.requests: dict[str, RouteDecision] = {}  # in flight
        self.limits: WorkerLimits | None = None  # the strictest of every worker's limits()

    # ------------------------------------------------------------ membership and load
    def add_worker(
        self, worker_id: str, handle: PrefillHandle | DecodeHandle, role: str, address: KVAddress | None = None
    ) -> None:
        want = PrefillHandle if role == "prefill" else DecodeHandle
        if not isinstance(handle, want):
            raise TypeError(f"worker {worker_id} of role {role!r} needs a {want.__name__}, got {type(handle).__name__}")
        self.workers[worker_id] = WorkerEntry(handle, role, address)

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

    async def refresh_loads(self) -> None:
        """Poll every worker's stats(); a worker that does not answer is marked unhealthy."""

        async def one(wid: str, w: WorkerEntry) -> None:
            try:
                w.stats = await asyncio.wait_for(w.handle.stats(), timeout=5.0)
            except (WorkerUnavailable, TimeoutError) as e:
                log.warning("stats poll of %s failed: %s", wid, e)
                self.mark_unhealthy(wid)

        await asyncio.gather(*(one(wid, w) for wid, w in list(self.workers.items())))

    def snapshot(self) -> list[WorkerLoad]:
        """The routing policy's view: the router's own exact counts, the last stats() report
        for the rest. A worker not polled yet reports no KV room and no cached prefixes."""
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
                    cached_prefix_hashes=st.cached_block_hashes if st else frozenset(),
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
    async def generate(self, spec: RequestSpec) -> AsyncIterator[StreamChunk]:
        """Stream a request's output; the last chunk has ``finished=True``.

        Raises ValueError for an invalid request, NoWorkerAvailable when nothing can serve.
        """
        rid = spec.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in flight")
        attempt = 0
        hashes = self.prefix_hashes(spec.prompt_token_ids) if self.policy.uses_prefix_hashes else []
        while True:
            decision = self.policy.route(len(spec.prompt_token_ids), self.snapshot(), hashes)
            d = self.workers[decision.decode_worker]
            p = self.workers[decision.prefill_worker] if decision.prefill_worker else None
            self.requests[rid] = decision
            finished = False
            d.inflight += 1
            # a local prefill (short prompt, mixed worker) counts as pending prompt tokens on the
            # decode worker until its first token arrives, so token_jsq sees mixed workers' load
            local_tokens = 0 if p is not None else len(spec.prompt_token_ids)
            d.prompt_tokens += local_tokens
            try:
                try:
                    cursor, first = await self._start(spec, d, p)
                except WorkerUnavailable as e:
                    self.mark_unhealthy(e.worker_id)
                    attempt += 1
                    if attempt > self.max_retries:
                        raise NoWorkerAvailable(f"request {rid} failed on {attempt} workers: {e}") from e
                    continue  # nothing reached the caller yet: place it again
                if first is not None:
                    finished = first.finished
                    yield first  # the first token reaches the caller before the decode hand-off
                    if finished:
                        return
                    lp = first.logprobs[0] if first.logprobs else None
                    try:
                        await d.decode.set_first_token(rid, FirstToken(first.token_ids[0], lp, first.num_cached_tokens))
                    except WorkerUnavailable as e:
                        self.mark_unhealthy(e.worker_id)
                        finished = True
                        yield StreamChunk([], finished=True, finish_reason="abort", error=str(e))
                        return
                async for chunk in self._read(spec, d, cursor):
                    d.prompt_tokens -= local_tokens
                    local_tokens = 0
                    finished = chunk.finished
                    yield chunk
                return
            finally:
                d.prompt_tokens -= local_tokens
                d.inflight -= 1
                self.requests.pop(rid, None)
                if not finished:  # cancelled, failed or re-routed: free its blocks everywhere
                    await self._abort_on(rid, d, p)

    async def _start(self, spec: RequestSpec, d: WorkerEntry, p: WorkerEntry | None) -> tuple[int, StreamChunk | None]:
        """Start the request; returns (decode read cursor, first-token chunk if prefilled remotely)."""
        rid = spec.request_id
        if p is None:
            await d.decode.generate_local(spec)
            return 0, None
        n = len(spec.prompt_token_ids)
        p.inflight += 1
        p.prompt_tokens += n
        # the decode worker reserves blocks while the prefill runs (its receiver buffers any
        # chunk that arrives first), so the reservation round trip is off the TTFT path
        reserve = asyncio.ensure_future(d.decode.start_transfer(spec))
        try:
            first = await p.prefill.prefill(spec, d.address)
        except BaseException:
            await asyncio.gather(reserve, return_exceptions=True)  # settle before the caller aborts
            raise
        finally:
            p.inflight -= 1
            p.prompt_tokens -= n
        await reserve
        if first.finished:
            await d.decode.abort(rid)
        return 1, first

    async def _read(self, spec: RequestSpec, d: WorkerEntry, cursor: int) -> AsyncIterator[StreamChunk]:
        rid = spec.request_id
        while True:
            try:
                chunk = await d.decode.read(rid, cursor, self.read_timeout_s)
            except WorkerUnavailable as e:
                self.mark_unhealthy(e.worker_id)
                yield StreamChunk([], finished=True, finish_reason="abort", error=str(e))
                return
            cursor += len(chunk.token_ids)
            if chunk.token_ids or chunk.finished:
                yield chunk
            if chunk.finished:
                return

    async def _abort_on(self, rid: str, d: WorkerEntry, p: WorkerEntry | None) -> None:
        for w in (p, d):
            if w is None:
                continue
            try:
                await w.handle.abort(rid)
            except Exception as e:  # the worker may be gone; its blocks went with it
                log.debug("abort of %s on %s: %s", rid, w.handle.worker_id, e)
