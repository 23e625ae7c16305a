"""Python SDK for the splitserve gRPC API (protos/splitserve.proto).

Imports only grpc, the generated protos and the standard library, so it can ship alone.

    with Client("localhost:50051", api_key="k") as c:
        out = c.generate("Hello", max_tokens=32, temperature=0.0)     # Completion
        for chunk in c.stream([1, 2, 3], max_tokens=8):                 # Chunk per message
            print(chunk.text, end="")

    async with AsyncClient("localhost:50051") as c:
        out = await c.generate("Hello", max_tokens=32)
        async for chunk in c.stream("Hello"):
            ...

Sampling keywords are the SamplingParams fields of the proto (max_tokens, temperature,
top_k, top_p, seed, stop, stop_token_ids, ignore_eos, logprobs, allow_speculation); unknown ones raise
TypeError, values the wire format cannot carry raise InvalidArgument before any call.

Timeouts: ``timeout`` (per call, else the client's default, else none) bounds the whole call
including retries; the server receives the remaining time as the gRPC deadline and aborts
the request when it passes. Retries: only UNAVAILABLE, only while no message of the stream
has arrived (nothing was generated for the caller yet), at most ``max_retries`` times with
exponential backoff (``backoff_s * 2**attempt``, jittered, capped at 2 s), or after the
server's ``retry-after`` when it sent one. Leaving a stream early (break, close, garbage
collection) cancels the call, which aborts the request. Errors are SplitServeError
subclasses chosen by status code; ``retry_after_s`` is the server's Retry-After (refusals).

Resume: ``resume(request_id, cursor)`` continues a request whose stream was lost from the
``cursor`` tokens received (chunks from index ``cursor`` on; see the .proto). ``stream(...,
resume=True)`` does it by itself: when the stream breaks with UNAVAILABLE after chunks
arrived (the server restarted, the connection broke), it resumes at the tokens received,
within the same ``max_retries``, so the caller sees one stream with no token repeated.

A stream's chunks carry contiguous ``index`` ranges; the server may merge deltas that queued
up into one chunk. ``abort(request_id)`` ends a stream started with that ``request_id``: its
last chunk then has finish_reason "abort".
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc

SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
_MAX_BACKOFF_S = 2.0


# ---------------------------------------------------------------- errors
class SplitServeError(Exception):
    """A call ended with a non-OK gRPC status. ``retry_after_s``: the server's Retry-After
    (trailing metadata "retry-after") on refusals, else None."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(SplitServeError):
    @property
    def field(self) -> str | None:
        """The parameter the server named ("max_tokens: must be ..." -> "max_tokens")."""
        head, sep, _ = self.message.partition(":")
        return head if sep and head.replace("_", "").isalnum() else None


class ResourceExhausted(SplitServeError):
    pass


class DeadlineExceeded(SplitServeError):
    pass


class Unavailable(SplitServeError):
    pass


class Unauthenticated(SplitServeError):
    pass


class AlreadyExists(SplitServeError):
    pass


class Cancelled(SplitServeError):
    pass


class NotFound(SplitServeError):
    pass


_ERRORS: dict[grpc.StatusCode, type[SplitServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def _trailing(e: grpc.RpcError, name: str) -> str | None:
    trailing = getattr(e, "trailing_metadata", None)
    try:
        items = trailing() if callable(trailing) else ()
    except Exception:  # a call that failed before any metadata (connection refused)
        items = ()
    for key, value in items or ():
        if key == name:
            return value
    return None


def _retry_after(e: grpc.RpcError) -> float | None:
    """The server's "retry-after" trailing metadata (seconds), if it sent one."""
    value = _trailing(e, "retry-after")
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def _request_failed(e: grpc.RpcError) -> bool:
    """The request itself failed (its retries ran out on the server): resuming replays that."""
    return _trailing(e, "splitserve-request-failed") == "true"


def _error(e: grpc.RpcError) -> SplitServeError:
    code = e.code()
    return _ERRORS.get(code, SplitServeError)(code, e.details() or "", _retry_after(e))


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class TLSConfig:
    ca: str | None = None  # PEM CA bundle that signed the server's cert (None: system roots)
    cert: str | None = None  # PEM client certificate, for mutual TLS (with ``key``)
    key: str | None = None
    server_name: str | None = None  # name to check the server cert against, if not the target host


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # most likely first


@dataclass(frozen=True)
class Chunk:
    """One streamed message: new tokens and their text; the last has finish_reason and usage."""

    request_id: str
    index: int  # position of token_ids[0] in the completion
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    usage: Usage | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @staticmethod
    def from_chunks(chunks: Sequence[Chunk]) -> Completion:
        last = chunks[-1] if chunks else None
        return Completion(
            request_id=last.request_id if last else "",
            token_ids=[t for c in chunks for t in c.token_ids],
            text="".join(c.text for c in chunks),
            finish_reason=last.finish_reason if last else None,
            usage=last.usage if last else None,
            logprobs=[lp for c in chunks for lp in c.logprobs],
        )


# ---------------------------------------------------------------- wire helpers
class _Cursor:
    """Where a stream is: its request id (from the first chunk) and the tokens received."""

    def __init__(self, start: int = 0):
        self.request_id: str | None = None
        self.tokens = start

    def saw(self, chunk: Chunk) -> None:
        self.request_id = chunk.request_id
        self.tokens = chunk.index + len(chunk.token_ids)


def _request(prompt: str | Sequence[int], request_id: str | None, sampling: dict) -> pb.GenerateRequest:
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
    req = pb.GenerateRequest(request_id=request_id or "")
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, Sequence):
        _set(req.token_ids, "ids", list(prompt), "prompt")
        req.token_ids.SetInParent()  # an empty list is still "token ids" (the server refuses it)
    else:
        raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        _set(req.sampling, name, value, name)
    return req


def _set(msg, name: str, value, field_name: str) -> None:
    try:
        if isinstance(value, list | tuple):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {e}") from None


def _chunk(msg: pb.GenerateResponse) -> Chunk:
    return Chunk(
        request_id=msg.request_id,
        index=msg.index,
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=[
            TokenLogprob(lp.token_id, lp.logprob, {t.token_id: t.logprob for t in lp.top}) for lp in msg.logprobs
        ],
        finish_reason=msg.finish_reason or None,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens)
        if msg.HasField("usage")
        else None,
    )


def _credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    read = lambda p: Path(p).read_bytes() if p else None
    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca), private_key=read(tls.key), certificate_chain=read(tls.cert)
    )


def _options(tls: TLSConfig | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls is not None and tls.server_name else []


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class _Policy:
    """Deadline and retry bookkeeping for one call."""

    def __init__(self, timeout: float | None, max_retries: int, backoff_s: float):
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.attempt = 0

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def retry_delay(self, e: grpc.RpcError, received: bool) -> float | None:
        """Seconds to wait before retrying, or None to give up and raise."""
        if e.code() != grpc.StatusCode.UNAVAILABLE or received or self.attempt >= self.max_retries:
            return None
        delay = min(self.backoff_s * 2**self.attempt, _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
        after = _retry_after(e)
        if after is not None:
            delay = max(delay, after)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        self.attempt += 1
        return delay


class _Base:
    def __init__(self, api_key, timeout, max_retries, backoff_s):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._metadata = _metadata(api_key)

    def _policy(self, timeout: float | None) -> _Policy:
        return _Policy(self.timeout if timeout is None else timeout, self.max_retries, self.backoff_s)


# ---------------------------------------------------------------- clients
class Client(_Base):
    """Blocking client; thread-safe (one channel, calls may run from several threads)."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls: TLSConfig | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
        backoff_s: float = 0.05,
    ):
        super().__init__(api_key, timeout, max_retries, backoff_s)
        opts = _options(tls)
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.secure_channel(target, _credentials(tls), options=opts)
        self._stub = pb_grpc.SplitServeStub(self._channel)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        resume: bool = False,
        **sampling,
    ) -> Iterator[Chunk]:
        """Chunks as they arrive. Bad arguments raise here, not at the first ``next()``.
        ``resume``: continue through Resume when the stream breaks after chunks arrived."""
        return self._stream(_request(prompt, request_id, sampling), self._policy(timeout), resume)

    def resume(self, request_id: str, cursor: int = 0, timeout: float | None = None) -> Iterator[Chunk]:
        """The request's chunks from token ``cursor`` on (it continues, or is replayed)."""
        return self._stream(pb.ResumeRequest(request_id=request_id, cursor=cursor), self._policy(timeout), True)

    def _stream(self, req, policy: _Policy, resume: bool) -> Iterator[Chunk]:
        at = _Cursor(req.cursor if isinstance(req, pb.ResumeRequest) else 0)
        while True:
            method = self._stub.Resume if isinstance(req, pb.ResumeRequest) else self._stub.Generate
            call = method(req, timeout=policy.remaining(), metadata=self._metadata)
            received = False
            try:
                for msg in call:
                    received = True
                    chunk = _chunk(msg)
                    at.saw(chunk)
                    yield chunk
                return
            except grpc.RpcError as e:
                delay = policy.retry_delay(e, received and not (resume and not _request_failed(e)))
                if delay is None:
                    raise _error(e) from e
            finally:
                call.cancel()  # no-op once the call ended; aborts the request if we leave early
            if at.request_id is not None:  # chunks arrived: continue after them, never repeat them
                req = pb.ResumeRequest(request_id=at.request_id, cursor=at.tokens)
            time.sleep(delay)

    def generate(self, prompt: str | Sequence[int], **kw) -> Completion:
        return Completion.from_chunks(list(self.stream(prompt, **kw)))

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        """Abort a request in flight on the server; False when it was not (any more)."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout).found

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self._stub.GetModelInfo, pb.ModelInfoRequest(), timeout)

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self._unary(self._stub.GetServerInfo, pb.ServerInfoRequest(), timeout)

    def _unary(self, method, req, timeout: float | None):
        policy = self._policy(timeout)
        while True:
            try:
                return method(req, timeout=policy.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = policy.retry_delay(e, received=False)
                if delay is None:
                    raise _error(e) from e
            time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client; create and use it on one event loop."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls: TLSConfig | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
        backoff_s: float = 0.05,
    ):
        super().__init__(api_key, timeout, max_retries, backoff_s)
        opts = _options(tls)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(target, _credentials(tls), options=opts)
        self._stub = pb_grpc.SplitServeStub(self._channel)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        resume: bool = False,
        **sampling,
    ) -> AsyncIterator[Chunk]:
        """``async for chunk in client.stream(...)``. Bad arguments raise here. ``resume``: as
        in Client.stream."""
        return self._stream(_request(prompt, request_id, sampling), self._policy(timeout), resume)

    def resume(self, request_id: str, cursor: int = 0, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """The request's chunks from token ``cursor`` on (it continues, or is replayed)."""
        return self._stream(pb.ResumeRequest(request_id=request_id, cursor=cursor), self._policy(timeout), True)

    async def _stream(self, req, policy: _Policy, resume: bool) -> AsyncIterator[Chunk]:
        at = _Cursor(req.cursor if isinstance(req, pb.ResumeRequest) else 0)
        while True:
            method = self._stub.Resume if isinstance(req, pb.ResumeRequest) else self._stub.Generate
            call = method(req, timeout=policy.remaining(), metadata=self._metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    chunk = _chunk(msg)
                    at.saw(chunk)
                    yield chunk
                return
            except grpc.RpcError as e:
                delay = policy.retry_delay(e, received and not (resume and not _request_failed(e)))
                if delay is None:
                    raise _error(e) from e
            finally:
                call.cancel()
            if at.request_id is not None:
                req = pb.ResumeRequest(request_id=at.request_id, cursor=at.tokens)
            await asyncio.sleep(delay)

    async def generate(self, prompt: str | Sequence[int], **kw) -> Completion:
        return Completion.from_chunks([c async for c in self.stream(prompt, **kw)])

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return (await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)).found

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._unary(self._stub.GetModelInfo, pb.ModelInfoRequest(), timeout)

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return await self._unary(self._stub.GetServerInfo, pb.ServerInfoRequest(), timeout)

    async def _unary(self, method, req, timeout: float | None):
        policy = self._policy(timeout)
        while True:
            try:
                return await method(req, timeout=policy.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = policy.retry_delay(e, received=False)
                if delay is None:
                    raise _error(e) from e
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "SplitServeError",
    "TLSConfig",
    "TokenLogprob",
    "Unavailable",
    "Unauthenticated",
    "Usage",
]
