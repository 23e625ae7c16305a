"""gRPC frontend: the ``splitserve.v1.SplitServe`` service (protos/splitserve.proto) over a
ServingBackend, plus the standard health (``grpc.health.v1``) and reflection services.

Lifecycle: ``port = await GrpcFrontend(backend, ...).start()`` on the event loop that owns the
backend's router; ``await frontend.stop()`` cancels the calls still open (which aborts their
requests) and stops serving. A stopped frontend is not started again; make a new one.

Status codes (the contract is in the .proto header):
- backend exceptions map one to one: InvalidRequest -> INVALID_ARGUMENT (message names the
  field), Overloaded -> RESOURCE_EXHAUSTED, RequestTimeout -> DEADLINE_EXCEEDED,
  NoWorkerAvailable and JournalUnavailable -> UNAVAILABLE, UnknownRequestId -> NOT_FOUND; a
  request id already in flight (here, or journaled by a server that restarted) ->
  ALREADY_EXISTS; request bytes that do not parse -> INVALID_ARGUMENT (we deserialize
  ourselves: a failing deserializer inside grpc would answer INTERNAL). Refusals
  (RESOURCE_EXHAUSTED, UNAVAILABLE before anything was streamed) carry the trailing metadata
  ``retry-after: <seconds>``;
- a request that fails after it started streaming (``Delta.error``: its workers failed past
  the failover retries) ends the stream with UNAVAILABLE, the error, and the trailing
  metadata ``splitserve-request-failed: true`` (so the SDK does not resume it). The tokens already sent
  are valid, but the completion is cut short, so an OK status would hide the failure;
- anything else is a bug and answers INTERNAL (the fuzz test asserts it never happens).

Request lifecycle inside ``_generate``: the call's remaining deadline becomes the backend's
``timeout_s``. The request runs under a fresh server-made id whatever ``request_id`` the
caller chose (that one names it for Abort, Resume and in responses, and is its journal key):
callers may reuse ids once a request finished, and workers keep per-id state for a while
after a request finishes. ``Resume`` streams ``ServingBackend.resume`` the same way. The backend generator is
drained by a separate "pump" task into a queue that the handler writes out; the generator is
closed only by the pump, once, and closing it aborts the request on every worker. A client
cancel or an expired deadline cancels the handler task (grpc does that, sometimes twice),
whose ``finally`` stops the pump without awaiting it. Deltas that queue up while a write is in
progress go out as one message (fewer writes under load, no added latency when idle). ``Abort`` stops the pump too; the
handler then ends the stream OK with a last message whose finish_reason is "abort".

Auth: with ``api_key`` set, every SplitServe method requires it (``authorization: Bearer``
or ``x-api-key`` metadata) and answers UNAUTHENTICATED otherwise; health and reflection are
separate services and stay open so probes and tooling need no key. With ``tls`` set the port
serves TLS only; with ``tls.ca`` too, a client without a certificate signed by it fails the
handshake (mutual TLS).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.frontends.auth import TLSFiles, api_key_from_headers, check_api_key, grpc_server_credentials
from cluster.frontends.service import (
    Delta,
    InvalidRequest,
    JournalUnavailable,
    NoWorkerAvailable,
    Overloaded,
    RequestIdInFlight,
    RequestTimeout,
    ServerInfo,
    ServingBackend,
    UnknownRequestId,
)
from protos import splitserve_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["SplitServe"].full_name  # "splitserve.v1.SplitServe"
# Trailing metadata of a stream that ended UNAVAILABLE because the request failed (its retries
# ran out), not because the server or connection went away: resuming it would replay the failure.
FAILED_METADATA = "splitserve-request-failed"
_OPTIONAL_SAMPLING = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "ignore_eos",
    "logprobs",
    "allow_speculation",
)
_TOKENIZE_IN_THREAD_CHARS = 8192  # longer text prompts are tokenized off the event loop


_END = object()  # the backend generator ended
_ABORTED = object()  # the pump was stopped (Abort, client gone, server stopping)


class _Pump:
    """Drains one backend generator into ``queue``: Deltas, then _END, _ABORTED or the exception.

    Runs as its own task so the generator is only ever closed from here, once; closing it
    aborts the request on every worker. ``stop()`` cancels the task and also sets a flag
    checked after every delta: on Python 3.11 ``asyncio.wait_for`` (which the backend awaits
    per chunk) swallows a cancellation that races with its inner future completing, so the
    flag is what guarantees the stop.
    """

    def __init__(self, gen: AsyncIterator[Delta]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopping = False
        self.task = asyncio.create_task(self._run(gen))

    def stop(self) -> None:
        self.stopping = True
        self.task.cancel()

    def done(self) -> bool:
        return self.task.done()

    async def _run(self, gen: AsyncIterator[Delta]) -> None:
        try:
            async for delta in gen:
                if self.stopping:
                    break
                self.queue.put_nowait(delta)
            self.queue.put_nowait(_ABORTED if self.stopping else _END)
        except asyncio.CancelledError:
            self.queue.put_nowait(_ABORTED)
            raise
        except Exception as e:
            self.queue.put_nowait(e)
        finally:
            await gen.aclose()


@dataclass(frozen=True)
class _Status:
    """How a call ends with an error: code, message, and for refusals Retry-After seconds."""

    code: grpc.StatusCode
    message: str
    retry_after_s: int | None = None
    failed: bool = False  # the request itself failed (after its retries): resuming replays the failure

    def trailing(self) -> tuple[tuple[str, str], ...]:
        out = () if self.retry_after_s is None else (("retry-after", str(self.retry_after_s)),)
        return (*out, (FAILED_METADATA, "true")) if self.failed else out


def _status_of(rid: str, e: BaseException, retry_after_s: int) -> _Status:
    if isinstance(e, InvalidRequest):
        return _Status(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, Overloaded):
        return _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s)
    if isinstance(e, RequestTimeout):
        return _Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
    if isinstance(e, NoWorkerAvailable):
        return _Status(grpc.StatusCode.UNAVAILABLE, str(e), retry_after_s)
    if isinstance(e, JournalUnavailable):
        return _Status(grpc.StatusCode.UNAVAILABLE, str(e), e.retry_after_s)
    if isinstance(e, UnknownRequestId):
        return _Status(grpc.StatusCode.NOT_FOUND, str(e))
    if isinstance(e, RequestIdInFlight):
        return _Status(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {e}")
    log.error("Generate %s failed", rid, exc_info=e)
    return _Status(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


class _Health(health.aio.HealthServicer):
    """Health servicer (service "" and SERVICE) whose status follows ``healthy()``: refreshed on
    each Check, and by GrpcFrontend every ``health_interval_s`` for Watch streams."""

    def __init__(self, healthy: Callable[[], bool]):
        super().__init__()
        self._healthy = healthy

    async def refresh(self) -> None:
        ok = self._healthy()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.set(service, status)

    async def Check(self, request, context):  # noqa: N802 (grpc method name)
        await self.refresh()
        return await super().Check(request, context)


class GrpcFrontend:
    def __init__(
        self,
        backend: ServingBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        tls: TLSFiles | None = None,
        health_interval_s: float = 1.0,
    ):
        self.backend = backend
        self.host = host
        self.port = port
        self.api_key = api_key
        self.tls = tls
        self.health_interval_s = health_interval_s
        self.active: dict[str, _Pump] = {}  # request id -> the pump of its Generate call
        self._pumps: set[asyncio.Task] = set()  # strong refs; a pump may outlive its call briefly
        self._server: grpc.aio.Server | None = None
        self._health = _Health(backend.healthy)
        self._health_task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        """Bind and serve; returns the bound port (``port=0`` picks a free one)."""
        if self._server is not None or self._health_task is not None:
            raise RuntimeError("a GrpcFrontend starts once")
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{self.host}:{self.port}"
        if self.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc_server_credentials(self.tls))
        if port == 0:
            raise OSError(f"gRPC frontend could not bind {address}")
        await self._health.refresh()
        await server.start()
        self._server, self.port = server, port
        self._health_task = asyncio.create_task(self._health_loop())
        tls = "plaintext" if self.tls is None else "mutual TLS" if self.tls.mutual else "TLS"
        log.info("gRPC frontend serving on %s:%d (%s, api key %s)", self.host, port, tls, bool(self.api_key))
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._health_task is not None:
            self._health_task.cancel()
        await self._server.stop(grace)
        self._server = None
        if self._pumps:  # let cancelled requests finish aborting on the workers
            await asyncio.wait(set(self._pumps), timeout=10.0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self._health.refresh()

    def _handlers(self) -> grpc.GenericRpcHandler:
        # Requests arrive as bytes (no request_deserializer) and are parsed in _parse.
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self._generate, response_serializer=pb.GenerateResponse.SerializeToString
                ),
                "Resume": grpc.unary_stream_rpc_method_handler(
                    self._resume, response_serializer=pb.GenerateResponse.SerializeToString
                ),
                "Abort": unary(self._abort, response_serializer=pb.AbortResponse.SerializeToString),
                "GetModelInfo": unary(self._model_info, response_serializer=pb.ModelInfo.SerializeToString),
                "GetServerInfo": unary(self._server_info, response_serializer=pb.ServerInfo.SerializeToString),
            },
        )

    # ------------------------------------------------------------ shared checks
    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        presented = api_key_from_headers(context.invocation_metadata() or ())
        if not check_api_key(self.api_key, presented):
            what = "missing" if presented is None else "wrong"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"API key {what}: send 'authorization: Bearer <key>'")

    async def _parse(self, cls: type, data: bytes, context: grpc.aio.ServicerContext) -> Any:
        await self._authorize(context)
        msg = cls()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # DecodeError, or a RuntimeError from the C++ parser
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {cls.__name__}: {e}")
        return msg

    async def _validate(self, req: pb.GenerateRequest) -> tuple[list[int], Any]:
        """(prompt ids, SamplingParams); raises InvalidRequest naming the field."""
        which = req.WhichOneof("prompt")
        if which == "text":
            prompt: Any = req.text
            if len(prompt) > _TOKENIZE_IN_THREAD_CHARS:
                ids = await asyncio.to_thread(self.backend.tokenize, prompt)
            else:
                ids = self.backend.tokenize(prompt)
        else:
            prompt = list(req.token_ids.ids) if which == "token_ids" else None
            ids = self.backend.tokenize(prompt)
        s = req.sampling
        fields = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING if s.HasField(name)}
        if s.stop:
            fields["stop"] = list(s.stop)
        if s.stop_token_ids:
            fields["stop_token_ids"] = list(s.stop_token_ids)
        return ids, self.backend.sampling_params(len(ids), **fields)

    # ------------------------------------------------------------ SplitServe methods
    async def _generate(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        req = await self._parse(pb.GenerateRequest, data, context)
        try:
            ids, params = await self._validate(req)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # rid: the caller's name for the request; internal: the id the cluster sees (module doc)
        internal = self.backend.new_request_id()
        rid = req.request_id or internal
        if rid in self.active:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already in flight")
        if req.request_id and await self.backend.in_flight(rid):  # e.g. journaled before a restart
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"request_id: {rid!r} is already in flight (continue it with Resume)",
            )
        remaining = context.time_remaining()
        timeout_s = None if remaining is None else max(remaining, 1e-3)  # 0 would mean "no timeout"
        gen = self.backend.generate(ids, params, internal, timeout_s, journal_key=rid, origin="grpc")
        await self._stream(gen, rid, internal, len(ids), 0, context, register=True)

    async def _resume(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        req = await self._parse(pb.ResumeRequest, data, context)
        rid = req.request_id
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        remaining = context.time_remaining()
        timeout_s = None if remaining is None else max(remaining, 1e-3)
        try:
            resumed = await self.backend.resume(rid, req.cursor, timeout_s)
        except Exception as e:  # NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, ... (a bug: INTERNAL)
            status = _status_of(rid, e, self.backend.retry_after_s)
            await context.abort(status.code, status.message, trailing_metadata=status.trailing())
        # a follower of a request another call of this server streams does not take its name
        await self._stream(
            resumed.deltas, rid, rid, resumed.prompt_tokens, req.cursor, context, register=rid not in self.active
        )

    async def _stream(
        self,
        gen: AsyncIterator[Delta],
        rid: str,
        internal: str,
        prompt_len: int,
        start: int,
        context: grpc.aio.ServicerContext,
        register: bool,
    ) -> None:
        """Pump ``gen`` into the call (module docstring); ``start``: the first token's index."""
        pump = _Pump(gen)
        self._pumps.add(pump.task)
        pump.task.add_done_callback(self._pumps.discard)
        if register:
            self.active[rid] = pump
        try:
            status, finished, sent = await self._write_out(pump, rid, internal, start, context)
        finally:
            # No await here: grpc may cancel this task more than once (client cancel, deadline).
            # The pump aborts the request on every worker as it unwinds.
            pump.stop()
            if self.active.get(rid) is pump:
                del self.active[rid]
        if status is not None:
            await context.abort(status.code, status.message, trailing_metadata=status.trailing())
        if not finished:  # stopped by Abort (or the backend ended without a finish): say so
            end = pb.Usage(prompt_tokens=prompt_len, completion_tokens=start + sent)
            await context.write(
                pb.GenerateResponse(request_id=rid, index=start + sent, finish_reason="abort", usage=end)
            )

    async def _write_out(
        self, pump: _Pump, rid: str, internal: str, start: int, context: grpc.aio.ServicerContext
    ) -> tuple[_Status | None, bool, int]:
        """Write the pump's deltas to the call; returns (error status, finished, tokens sent)."""
        sent = 0
        held = None  # an item taken from the queue while coalescing, handled next
        while True:
            if held is not None:
                item, held = held, None
            else:
                item = await pump.queue.get()
            if isinstance(item, Delta) and item.error is None:
                # Coalesce deltas that queued up while we were writing (never waits).
                while item.finish_reason is None and not pump.queue.empty():
                    nxt = pump.queue.get_nowait()
                    if not (isinstance(nxt, Delta) and nxt.error is None):
                        held = nxt
                        break
                    item = _merge(item, nxt)
            if not isinstance(item, Delta):
                if item is _ABORTED or item is _END:
                    return None, False, sent
                return _status_of(f"{rid} ({internal})", item, self.backend.retry_after_s), False, sent
            if item.error is not None:
                message = f"request {rid} failed after {start + sent} tokens: {item.error}"
                return _Status(grpc.StatusCode.UNAVAILABLE, message, failed=True), False, sent
            await context.write(_response(rid, item))
            sent += len(item.token_ids)
            if item.finish_reason is not None:
                return None, True, sent

    async def _abort(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        req = await self._parse(pb.AbortRequest, data, context)
        pump = self.active.get(req.request_id)
        if pump is None or pump.done():
            return pb.AbortResponse(found=False)
        pump.stop()
        return pb.AbortResponse(found=True)

    async def _model_info(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self._parse(pb.ModelInfoRequest, data, context)
        i = self.backend.model_info()
        return pb.ModelInfo(
            model=i.model,
            architecture=i.architecture,
            vocab_size=i.vocab_size,
            max_model_len=i.max_model_len,
            num_layers=i.num_layers,
            hidden_size=i.hidden_size,
            eos_token_ids=list(i.eos_token_ids),
        )

    async def _server_info(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        await self._parse(pb.ServerInfoRequest, data, context)
        return server_info_message(self.backend.server_info())


def _merge(a: Delta, b: Delta) -> Delta:
    """``a`` then ``b`` (consecutive, neither failed) as one delta."""
    return Delta(
        index=a.index,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        logprobs=a.logprobs + b.logprobs,
        finish_reason=b.finish_reason,
        usage=b.usage,
    )


def _response(rid: str, delta: Delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=rid,
        index=delta.index,
        token_ids=delta.token_ids,
        text=delta.text,
        finish_reason=delta.finish_reason or "",
    )
    for lp in delta.logprobs:
        top = [pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()]
        msg.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=top))
    if delta.usage is not None:
        u = delta.usage
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens
            )
        )
    return msg


def server_info_message(info: ServerInfo) -> pb.ServerInfo:
    """The ServerInfo message; ``details_json`` carries the whole typed report as JSON."""
    cluster = info.cluster
    msg = pb.ServerInfo(
        inflight=info.inflight,
        max_queue=info.max_queue,
        details_json=json.dumps(cluster.to_json(), default=str, sort_keys=True),
        state_store=cluster.state.backend,
        state_store_status=cluster.state.status,
    )
    pools: dict[str, pb.PoolInfo] = {}
    for w in cluster.workers:
        st = w.stats
        spec = st.speculation if st is not None else None  # a speculating worker's report
        ep = st.expert_parallel if st is not None else None  # an EP rank's report
        msg.workers.append(
            pb.WorkerInfo(
                worker_id=w.worker_id,
                role=w.role,
                current_role=w.current_role,
                healthy=w.healthy,
                inflight=w.inflight,
                # a worker not polled yet has no report: its KV fields stay unset (0 on the wire)
                free_kv_blocks=st.engine.free_kv_blocks if st is not None else 0,
                total_kv_blocks=st.engine.total_kv_blocks if st is not None else 0,
                draft_free_kv_blocks=(spec.draft_free_kv_blocks or 0) if spec is not None else 0,
                draft_total_kv_blocks=(spec.draft_total_kv_blocks or 0) if spec is not None else 0,
                ep_rank=ep.rank if ep is not None else 0,
                ep_world_size=ep.world_size if ep is not None else 0,
            )
        )
        pool = pools.setdefault(w.current_role, pb.PoolInfo(role=w.current_role))
        pool.num_workers += 1
        pool.num_healthy += int(w.healthy)
    for a in cluster.attention_workers:  # attention offload: each holds its model worker's KV
        healthy = a.state in ("waiting", "serving")
        msg.workers.append(
            pb.WorkerInfo(
                worker_id=a.worker_id,
                role="attention",
                current_role="attention",
                healthy=healthy,
                free_kv_blocks=cluster.attention_free_blocks(a) or 0,  # unknown: unset (0 on the wire)
                total_kv_blocks=a.total_blocks,
            )
        )
        pool = pools.setdefault("attention", pb.PoolInfo(role="attention"))
        pool.num_workers += 1
        pool.num_healthy += int(healthy)
    msg.pools.extend(pools[k] for k in sorted(pools))
    return msg


__all__ = ["SERVICE", "GrpcFrontend", "server_info_message"]
