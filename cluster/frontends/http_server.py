"""OpenAI-compatible HTTP frontend: FastAPI app over a ServingBackend, served by uvicorn.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /v1/models/{id}, GET /v1/resume/{id}?cursor=N (an extension: continue a streamed
completion whose stream was lost, from the N tokens received; ``id`` is the response id
(``cmpl-...``, ``chatcmpl-...``, also the ``x-request-id`` header) or a gRPC request_id; an
SSE stream of the request's own chunk format whose text starts at token N; 404 when the
journal has no such request; ServingBackend.resume), GET /health (200 when a decode-capable
worker is healthy, else 503; the body's ``status`` is "ok", or "degraded" while the state
store is unreachable and serving goes on without durability; never needs the API key, for
load-balancer probes), GET /metrics (the Prometheus exposition,
when the app is given the Metrics; open by default, as Prometheus expects, or behind the API
key with ``protect_metrics``). ``MetricsFrontend`` serves the same endpoint on a port of its
own (cluster/frontends/metrics_endpoint.py). TLS and mutual TLS: ``tls=TLSFiles(...)``
(cluster/frontends/asgi_server.py).

Status codes (body ``{"error": {message, type, param, code}}``): 400 invalid request
(``param`` names the field; malformed JSON and wrong types included), 401 API key missing or
wrong, 404 unknown model, path or (Resume) request, 408 request deadline passed, 429
Overloaded, 503 NoWorkerAvailable, the journal unreadable, or a request that failed
mid-stream after its retries. 429 and the 503 refusals carry ``Retry-After`` (seconds).

Request lifecycle (both endpoints): parse + validate -> tokenize -> ServingBackend.generate.
Non-streaming: the deltas are collected while watching for client disconnect. Streaming:
the first delta is awaited before the response starts, so admission errors (429, 503, 400)
still get their status; then SSE ``data: {chunk}\\n\\n`` events end with ``data: [DONE]``;
an error after the first delta is sent as an ``{"error": ...}`` event. Whenever the client
disconnects (or the server cancels the response), the generation task is cancelled and the
backend generator closed, which aborts the request on every worker and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from cluster.frontends.asgi_server import AsgiServer
from cluster.frontends.auth import TLSFiles, api_key_from_headers, check_api_key
from cluster.frontends.chat_template import ChatTemplateError
from cluster.frontends.metrics_endpoint import MetricsEndpoint
from cluster.frontends.openai_api import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    UNAUTHORIZED,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
    backend_error,
    error_response,
    invalid,
    parse_request,
    read_json_body,
    validation_error,
    worker_failed,
)
from cluster.frontends.service import (
    Delta,
    InvalidRequest,
    JournalUnavailable,
    NoWorkerAvailable,
    Overloaded,
    RequestTimeout,
    ServingBackend,
    UnknownRequestId,
    Usage,
)
from cluster.metrics.registry import Metrics
from engine.request import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (only valid after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _finish(*tasks: asyncio.Future) -> None:
    """Cancel ``tasks`` and wait until their cleanup (request aborts) has run."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _finish(*([watch] if task.done() else [task, watch]))
    if task.cancelled():
        raise ClientGone()
    return task.result()


class EventStream(StreamingResponse):
    """SSE response that ends at the first of: events exhausted, client disconnect (an
    ``http.disconnect`` message or a failed send), cancellation. In every case the event
    iterator is closed before ``__call__`` returns (whatever the ASGI spec version), which
    aborts the request behind it."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _finish(pump, watch)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        if pump.done() and not pump.cancelled() and (e := pump.exception()) is not None and not isinstance(e, OSError):
            raise e


@dataclass
class Prepared:
    """A validated request, ready to run."""

    request_id: str  # the backend's id; the response id is "<cmpl|chatcmpl>-<request_id>"
    prompt_ids: list[int]
    params: SamplingParams
    out: ResponseBuilder


class OpenAIServer:
    """Request handling behind the routes (one per app)."""

    def __init__(self, backend: ServingBackend):
        self.backend = backend
        self.created = int(time.time())
        self.chat_template = backend.chat_template

    # ------------------------------------------------------------ preparing requests
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.backend.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves {self.backend.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def _prepared(
        self, kind: str, ids: list[int], params: SamplingParams, logprobs: int | None, token_ids: bool
    ) -> Prepared:
        rid = self.backend.new_request_id()
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        tok = self.backend.tokenizer
        out = ResponseBuilder(
            kind,  # type: ignore[arg-type]
            f"{prefix}-{rid}",
            self.backend.model_name,
            int(time.time()),
            token_text=lambda t: tok.decode([t], skip_special_tokens=False),
            logprobs=logprobs,
            token_ids=token_ids,
        )
        return Prepared(rid, ids, params, out)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        if (err := req.unsupported_fields()) is not None:
            raise err
        self._check_model(req.model)
        ids = self.backend.tokenize(req.single_prompt(), "prompt")
        params = self.backend.sampling_params(
            len(ids), default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS, **req.sampling_fields(), logprobs=req.logprobs
        )
        return self._prepared("completion", ids, params, req.logprobs, req.return_token_ids)

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        if (err := req.unsupported_fields()) is not None:
            raise err
        self._check_model(req.model)
        if self.chat_template is None:
            raise invalid("messages", "this model has no chat template; use /v1/completions")
        try:
            text = self.chat_template.render([m.for_template() for m in req.messages], add_generation_prompt=True)
        except ChatTemplateError as e:
            raise invalid("messages", str(e)) from None
        ids = self.backend.tokenize(self.backend.tokenizer.encode(text, add_special_tokens=False), "messages")
        fields = req.sampling_fields()
        renames = {"logprobs": "top_logprobs"}  # backend field -> the field this client sent
        max_tokens = req.max_tokens
        if req.max_completion_tokens is not None:
            max_tokens, renames["max_tokens"] = req.max_completion_tokens, "max_completion_tokens"
        fields["max_tokens"] = max_tokens  # None: the rest of the context (the chat default)
        top = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = self.backend.sampling_params(len(ids), default_max_tokens=None, **fields, logprobs=top)
        except InvalidRequest as e:
            name = renames.get(e.field, e.field)
            raise invalid(name, str(e).removeprefix(f"{e.field}: ")) from None
        return self._prepared("chat", ids, params, top, req.return_token_ids)

    # ------------------------------------------------------------ serving
    async def serve(self, request: Request, p: Prepared, stream: bool, include_usage: bool) -> Response:
        gen = self.backend.generate(
            p.prompt_ids, p.params, request_id=p.request_id, journal_key=p.request_id, origin=p.out.kind
        )
        out = p.out
        headers = {"x-request-id": out.response_id}
        try:
            if not stream:
                body = await run_unless_disconnected(request.receive, self._collect(gen, out))
                return JSONResponse(body, headers=headers)
            first = await run_unless_disconnected(request.receive, anext(gen, None))
        except ClientGone:
            await gen.aclose()
            return Response(status_code=499)  # nobody reads it; the request was aborted
        except BaseException:
            await gen.aclose()
            raise
        return EventStream(self._events(first, gen, out, include_usage), headers=headers)

    async def _collect(self, gen: AsyncIterator[Delta], out: ResponseBuilder) -> dict:
        text, ids, lps = [], [], []
        last: Delta | None = None
        async for d in gen:
            text.append(d.text)
            ids += d.token_ids
            lps += d.logprobs
            last = d
        if last is None or last.finish_reason is None:
            raise ApiError(503, "the request ended without a result", "server_error", code="service_unavailable")
        if last.error:
            raise worker_failed(last.error)
        return out.response("".join(text), ids, lps, last.finish_reason, last.usage or Usage())

    async def _events(
        self,
        first: Delta | None,
        gen: AsyncIterator[Delta],
        out: ResponseBuilder,
        include_usage: bool,
        role: bool = True,
    ) -> AsyncIterator[str]:
        """SSE events for one request; closing this iterator closes (aborts) ``gen``. ``role``:
        a chat stream opens with the assistant role (not a resumed one, past its start)."""
        try:
            if out.kind == "chat" and role:
                yield _sse(out.chunk({"role": "assistant", "content": ""}, None, None, include_usage))
            d = first
            while d is not None:
                if d.error:
                    yield _sse(worker_failed(d.error).body())
                    break
                if d.text or (d.token_ids and (out.logprobs is not None or out.token_ids)):
                    piece = {"content": d.text} if out.kind == "chat" else d.text
                    yield _sse(out.chunk(piece, d, None, include_usage))
                if d.finish_reason is not None:
                    yield _sse(out.chunk({} if out.kind == "chat" else "", None, d.finish_reason, include_usage))
                    if include_usage:
                        yield _sse(out.usage_chunk(d.usage or Usage()))
                    break
                try:
                    d = await anext(gen, None)
                except Exception as e:  # the status line is sent: report it in the stream
                    yield _sse(backend_error(e, self.backend.retry_after_s).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()  # type: ignore[attr-defined]

    async def resume(self, request: Request, response_id: str, cursor: int) -> Response:
        """An SSE stream of the request's chunks from token ``cursor`` on (module docstring)."""
        key = response_id
        for prefix in ("chatcmpl-", "cmpl-"):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        resumed = await self.backend.resume(key, cursor)
        kind = "chat" if resumed.origin == "chat" else "completion"
        tok = self.backend.tokenizer
        out = ResponseBuilder(
            kind,  # type: ignore[arg-type]
            response_id,
            self.backend.model_name,
            int(time.time()),
            token_text=lambda t: tok.decode([t], skip_special_tokens=False),
            token_ids=True,
        )
        gen = resumed.deltas
        try:
            first = await run_unless_disconnected(request.receive, anext(gen, None))
        except ClientGone:
            await gen.aclose()
            return Response(status_code=499)
        except BaseException:
            await gen.aclose()
            raise
        return EventStream(
            self._events(first, gen, out, include_usage=True, role=cursor == 0), headers={"x-request-id": response_id}
        )

    # ------------------------------------------------------------ info
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        b = self.backend
        return {
            "id": b.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "splitserve",
            "max_model_len": b.max_model_len,
            "vocab_size": b.limits.vocab_size,
        }


_STATUS_TYPES = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error"}


def create_app(
    backend: ServingBackend,
    api_key: str | None = None,
    max_body_bytes: int = 32 << 20,
    metrics: Metrics | None = None,
    protect_metrics: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app. With ``api_key`` set, every /v1 route needs
    ``Authorization: Bearer <key>`` (or ``x-api-key``); /health never does. With ``metrics``,
    GET /metrics serves them: open to all, or with ``protect_metrics`` behind the API key."""
    if protect_metrics and not api_key:
        raise ValueError("protect_metrics needs an api_key")
    server = OpenAIServer(backend)
    app = FastAPI(title="splitserve", summary="OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.openai = server

    def authorize(request: Request) -> None:
        if api_key and not check_api_key(api_key, api_key_from_headers(request.headers.items())):
            raise UNAUTHORIZED

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e, {"www-authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(e.status_code, "invalid_request_error" if e.status_code < 500 else "server_error")
        return error_response(ApiError(e.status_code, str(e.detail), kind), dict(e.headers or {}))

    async def _backend(_: Request, e: Exception) -> JSONResponse:
        return error_response(backend_error(e, backend.retry_after_s))

    for exc in (InvalidRequest, Overloaded, NoWorkerAvailable, RequestTimeout, UnknownRequestId, JournalUnavailable):
        app.add_exception_handler(exc, _backend)
    app.add_exception_handler(Exception, _backend)  # a bug: 500 with the OpenAI body, logged

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(CompletionRequest, await read_json_body(request, max_body_bytes))
        return await server.serve(request, server.prepare_completion(req), req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(ChatCompletionRequest, await read_json_body(request, max_body_bytes))
        return await server.serve(request, server.prepare_chat(req), req.stream, req.include_usage)

    @app.get("/v1/resume/{response_id:path}")
    async def resume(request: Request, response_id: str, cursor: str = "0") -> Response:
        authorize(request)
        try:
            n = int(cursor)
        except ValueError:
            raise invalid("cursor", f"must be an integer >= 0, got {cursor!r}") from None
        return await server.resume(request, response_id, n)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict:
        authorize(request)
        server._check_model(model_id)
        return server.model_card()

    @app.get("/health")
    async def health() -> Response:
        h = backend.health()
        if h.serving:  # degraded (the state store unreachable) still serves: 200
            return JSONResponse({"status": h.status, "state_store": h.state_store, "detail": h.detail})
        err = ApiError(
            503,
            "no healthy decode worker",
            "server_error",
            code="service_unavailable",
            retry_after_s=backend.retry_after_s,
        )
        return error_response(err)

    if metrics is not None:
        app.add_route("/metrics", MetricsEndpoint(metrics, api_key if protect_metrics else None), methods=["GET"])
    return app


class HttpFrontend(AsgiServer):
    """Serves ``create_app(backend, api_key, metrics, protect_metrics)`` (see AsgiServer)."""

    def __init__(
        self,
        backend: ServingBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        graceful_shutdown_s: float = 5.0,
        tls: TLSFiles | None = None,
        metrics: Metrics | None = None,
        protect_metrics: bool = False,
    ):
        app = create_app(backend, api_key, metrics=metrics, protect_metrics=protect_metrics)
        super().__init__(app, host, port, tls, graceful_shutdown_s, "OpenAI HTTP frontend")


__all__ = ["HttpFrontend", "OpenAIServer", "create_app"]
