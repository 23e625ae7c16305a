"""Router: places each request on a prefill and a decode worker and streams its tokens back.

Per request (``generate``):
    route (RoutingPolicy on the current load snapshot)
    SPLIT:  decode.start_transfer -> prefill.prefill (returns the first token, yielded at
            once) -> decode.set_first_token -> decode.read from cursor 1 until finished
    local:  decode.generate_local -> decode.read from cursor 0 until finished
Tokens reach the caller in order, each once (cursor reads). A worker that fails before the
first token is marked unhealthy and the request is re-routed (``max_retries``); after the
first token a failure ends the request with finish_reason "abort" and the error. A caller
that stops iterating (cancel, disconnect) aborts the request on both workers, which frees
its KV blocks.

Load snapshots: the router counts its own in-flight requests and prompt tokens per worker
(exact, updated per request) and takes KV block counts from periodic ``load()`` polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster.control.handles import WorkerHandle, WorkerUnavailable
from cluster.control.routing import NoWorkerAvailable, RouteDecision, RoutingPolicy, WorkerLoad
from engine.runtime.streams import RequestSpec, StreamChunk

log = logging.getLogger(__name__)


@dataclass
class WorkerEntry:
    handle: WorkerHandle
    role: str  # configured pool role
    address: Any = None  # KV receiver address (decode-capable workers)
    healthy: bool = True
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    inflight: int = 0  # requests the router has placed here and not seen finish
    prompt_tokens: int = 0  # prompt tokens placed here whose prefill has not returned
    running: int = 0
    stats: dict = field(default_factory=dict)  # last load() report


class Router:
    def __init__(self, policy: RoutingPolicy, read_timeout_s: float = 1.0, max_retries: int = 2):
        self.policy = policy
        self.workers: dict[str, WorkerEntry] = {}
        self.read_timeout_s = read_timeout_s
        self.max_retries = max_retries
        self.requests: dict[str, RouteDecision] = {}  # in flight

    # ------------------------------------------------------------ membership and load
    def add_worker(self, worker_id: str, handle: WorkerHandle, role: str, address: Any = None) -> None:
        self.workers[worker_id] = WorkerEntry(handle, role, address)

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
        """Poll every worker's load(); a worker that does not answer is marked unhealthy."""

        async def one(wid: str, w: WorkerEntry) -> None:
            try:
                stats = await asyncio.wait_for(w.handle.call("load"), timeout=5.0)
            except (WorkerUnavailable, TimeoutError) as e:
                log.warning("load poll of %s failed: %s", wid, e)
                self.mark_unhealthy(wid)
                return
            w.stats = stats
            w.free_kv_blocks, w.total_kv_blocks = stats["free_kv_blocks"], stats["total_kv_blocks"]
            w.running = stats["running_requests"]

        await asyncio.gather(*(one(wid, w) for wid, w in list(self.workers.items())))

    def snapshot(self) -> list[WorkerLoad]:
        return [
            WorkerLoad(
                worker_id=wid,
                role=w.role,
                healthy=w.healthy,
                pending_requests=w.inflight,
                pending_prompt_tokens=w.prompt_tokens,
                running_requests=max(w.running, w.inflight),
                free_kv_blocks=min(w.free_kv_blocks, w.total_kv_blocks),
                total_kv_blocks=w.total_kv_blocks,
            )
            for wid, w in self.workers.items()
        ]

    # ------------------------------------------------------------ requests
    async def generate(self, spec: RequestSpec) -> AsyncIterator[StreamChunk]:
        """Stream a request's output; the last chunk has ``finished=True``.

        Raises ValueError for an invalid request, NoWorkerAvailable when nothing can serve.
        """
        rid = spec.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in flight")
        attempt = 0
        while True:
            decision = self.policy.route(len(spec.prompt_token_ids), self.snapshot())
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
                        await d.handle.call("set_first_token", rid, first.token_ids[0], lp)
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
            await d.handle.call("generate_local", spec)
            return 0, None
        n = len(spec.prompt_token_ids)
        p.inflight += 1
        p.prompt_tokens += n
        # the decode worker reserves blocks while the prefill runs (its receiver buffers any
        # chunk that arrives first), so the reservation round trip is off the TTFT path
        reserve = asyncio.ensure_future(d.handle.call("start_transfer", spec))
        try:
            first: StreamChunk = await p.handle.call("prefill", spec, d.address)
        except BaseException:
            await asyncio.gather(reserve, return_exceptions=True)  # settle before the caller aborts
            raise
        finally:
            p.inflight -= 1
            p.prompt_tokens -= n
        await reserve
        if first.finished:
            await d.handle.call("abort", rid)
        return 1, first

    async def _read(self, spec: RequestSpec, d: WorkerEntry, cursor: int) -> AsyncIterator[StreamChunk]:
        rid = spec.request_id
        while True:
            try:
                chunk: StreamChunk = await d.handle.call("read", rid, cursor, self.read_timeout_s)
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
                await w.handle.call("abort", rid)
            except Exception as e:  # the worker may be gone; its blocks went with it
                log.debug("abort of %s on %s: %s", rid, w.handle.worker_id, e)
