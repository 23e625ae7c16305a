"""ServingBackend: what every frontend (gRPC, OpenAI HTTP, in-process) calls.

It turns user input into a validated RequestSpec (tokenizing text, checking every field
with a message naming it against the limits the workers reported: vocabulary, context
length, KV capacity), admits it under a bounded in-flight limit, runs it through the
Router, turns token ids into text deltas (cutting at stop strings exactly as the decode
worker does) and enforces the request deadline. Frontends map its exceptions to status
codes: InvalidRequest -> INVALID_ARGUMENT / 400, Overloaded -> RESOURCE_EXHAUSTED / 429,
NoWorkerAvailable -> UNAVAILABLE / 503, RequestTimeout -> DEADLINE_EXCEEDED / 408,
UnknownRequestId -> NOT_FOUND / 404, JournalUnavailable -> UNAVAILABLE / 503. Every refusal
(Overloaded, NoWorkerAvailable, JournalUnavailable) carries ``retry_after_s``, which the
frontends send as Retry-After.

Resume (``resume(key, cursor)``): a client that lost its stream continues from its cursor
(the number of tokens it received). The request is found by its journal key (the id the
client knows): still running here, it is followed live; finished, its tokens are replayed
from the journal (never generated again); in the journal but not running (the serving
process restarted, or the client's disconnect cancelled it), it is continued on the workers
with its journaled tokens re-prefilled (the router journals tokens before they reach any
client, so the cursor is never past them). Replayed tokens carry no logprobs (the journal
keeps token ids only).

This is the one place a request is validated; workers assert, they do not re-validate.
``max_tokens``: an explicit value whose prompt + max_tokens exceeds the context is refused
(naming the field), as OpenAI and vLLM do; an omitted one takes the endpoint's default
(``default_max_tokens``; None = the rest of the context), clamped to the context.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.control.info import ClusterInfo, worker_info
from cluster.control.ledger import RequestLedger
from cluster.control.router import RequestInFlight, Router
from cluster.control.routing import NoWorkerAvailable, WorkersBusy
from cluster.control.state import CANCELLED, StoreUnavailable
from cluster.frontends.chat_template import ChatTemplate
from engine.config import ModelConfig
from engine.models.gguf import STAMP_FILE, resolve_model_path
from engine.request import SamplingParams, TokenLogprobs
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.types import RequestSpec, StreamChunk, WorkerLimits

if TYPE_CHECKING:
    from cluster.metrics.registry import Metrics, RequestTracker

MAX_TOKENS_LIMIT = 1 << 20


class InvalidRequest(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Overloaded(RuntimeError):
    """Refused: the server or its workers are at their bounds; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(TimeoutError):
    pass


class UnknownRequestId(KeyError):
    """Resume named a request the journal does not hold (never started, or expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown request"


class JournalUnavailable(RuntimeError):
    """The journal cannot be read now (its store is degraded); retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestIdInFlight(ValueError):
    """Generate named a request id that is still in flight (here, or per the journal)."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """GetModelInfo's answer (the served model as the workers run it)."""

    model: str
    architecture: str
    vocab_size: int
    max_model_len: int  # the workers' context limit: prompt + generated tokens
    num_layers: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ServerInfo:
    """GetServerInfo's answer: the cluster, and this frontend's admission state."""

    cluster: ClusterInfo
    inflight: int  # requests admitted by this backend
    max_queue: int  # in-flight limit; more are refused as overloaded


@dataclass(frozen=True)
class Resumed:
    """A resumed request: where it came from, and its deltas from the caller's cursor on (how
    it was served, live / replayed / continued, is counted in ``router.stats.resumed``)."""

    origin: str  # who started it: "grpc" | "completion" | "chat" | "router"
    prompt_tokens: int
    deltas: AsyncIterator[Delta]


@dataclass(frozen=True)
class Health:
    """What /health and the gRPC health service report."""

    serving: bool  # a decode-capable worker is healthy
    state_store: str  # "ok" | "degraded" (serving without durability)
    detail: str  # the state store's one line

    @property
    def status(self) -> str:
        if not self.serving:
            return "unavailable"
        return "ok" if self.state_store == "ok" else "degraded"


@dataclass
class Delta:
    """One streamed piece of a completion; the last one has ``finish_reason`` set."""

    index: int  # position of token_ids[0] in the completion
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None  # on the last delta


class _Admission:
    """One stream counted as an admitted request (in ``ServingBackend.inflight`` and the
    request metrics) from ``start()`` until ``finish()``.

    Lifecycle: a new request or a continuation starts it before its stream is read; a
    follower of a live request (Resume) leaves it unstarted, because the request's owner
    counts it, and starts it only if it takes the request over. ``start()`` refuses past
    ``max_queue`` (Overloaded). The first ``untracked`` tokens (replayed from the journal,
    already counted when they were generated) are not counted again.
    """

    def __init__(self, backend: ServingBackend, prompt_len: int, untracked: int = 0):
        self.backend = backend
        self.prompt_len = prompt_len
        self.untracked = untracked
        self.started = False
        self.tracker: RequestTracker | None = None

    def start(self) -> None:
        assert not self.started, "an admission is started once"
        self.backend._admit()
        self.started = True
        self.backend.inflight += 1
        if self.backend.metrics is not None:
            self.tracker = self.backend.metrics.track(self.prompt_len)

    def tokens(self, n: int) -> None:
        counted = max(0, n - self.untracked)
        self.untracked = max(0, self.untracked - n)
        if self.tracker is not None:
            self.tracker.tokens(counted)

    def finish(self, outcome: str, cached_tokens: int) -> None:
        if not self.started:
            return
        self.started = False
        if self.tracker is not None:
            self.tracker.finish(outcome, cached_tokens)
        self.backend.inflight -= 1


class ServingBackend:
    def __init__(
        self,
        router: Router,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
        model_name: str,
        max_queue: int = 1024,
        request_timeout_s: float = 600.0,
        info: Callable[[], ClusterInfo] | None = None,
        metrics: Metrics | None = None,
        chat_template: ChatTemplate | None = None,
        retry_after_s: int = 1,
    ):
        self.router = router
        self.retry_after_s = retry_after_s  # sent with every refusal (Retry-After)
        self.chat_template = chat_template  # None: the model has none (chat requests get 400)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self._info = info
        self.metrics = metrics  # observes every admitted request's timeline (cluster.metrics.registry)
        self.inflight = 0
        self._ids = itertools.count()

    @staticmethod
    def from_model_dir(router: Router, model: str, **kw: Any) -> ServingBackend:
        """A backend for ``model``: a Hugging Face directory or a .gguf file (its cached conversion).

        The served name is the directory's name, or the .gguf file's stem ("SmolLM2-135M-
        Instruct.Q4_1"), also when ``model`` is the converted directory of a GGUF file.
        The chat template is read as transformers reads it (frontends/chat_template.py).
        """
        path = resolve_model_path(model)
        source = model
        stamp = os.path.join(path, STAMP_FILE)  # a GGUF conversion's: {"source": <.gguf path>, ...}
        if path == model and os.path.isfile(stamp):
            with open(stamp) as f:
                source = str(json.load(f).get("source") or model)
        name = os.path.basename(os.path.normpath(source))
        name = name.removesuffix(".gguf") if source != path else name
        template = ChatTemplate.from_model_dir(path)
        return ServingBackend(
            router, Tokenizer(path), ModelConfig.from_hf_dir(path), name, chat_template=template, **kw
        )

    # ------------------------------------------------------------ validation
    @property
    def limits(self) -> WorkerLimits:
        """The strictest limits of every worker (reported when the cluster started)."""
        if self.router.limits is None:
            raise RuntimeError("the workers have not reported their limits: start the cluster before serving")
        return self.router.limits

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    def tokenize(self, prompt: str | list[int] | None, field_name: str = "prompt") -> list[int]:
        if prompt is None or (isinstance(prompt, str | list) and len(prompt) == 0):
            raise InvalidRequest(field_name, "must not be empty")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequest(field_name, "encodes to zero tokens")
        else:
            ids = list(prompt)
            vocab = self.limits.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise InvalidRequest(field_name, f"token id {t!r} is outside the vocabulary [0, {vocab})")
        lim = self.limits
        if len(ids) >= lim.max_model_len:
            raise InvalidRequest(
                field_name, f"prompt has {len(ids)} tokens; the model allows fewer than {lim.max_model_len}"
            )
        if len(ids) + 1 > lim.max_context_tokens:  # room for the prompt and one generated token
            raise InvalidRequest(
                field_name,
                f"prompt has {len(ids)} tokens; the workers' KV caches hold at most {lim.max_context_tokens} "
                "tokens per request",
            )
        if not lim.chunked_prefill and len(ids) > lim.max_num_batched_tokens:
            raise InvalidRequest(
                field_name,
                f"prompt has {len(ids)} tokens; without chunked prefill at most {lim.max_num_batched_tokens} fit a step",
            )
        return ids

    def sampling_params(self, prompt_len: int, default_max_tokens: int | None = None, **kw: Any) -> SamplingParams:
        """SamplingParams from user fields; None means default. Errors name the field.

        ``default_max_tokens``: the endpoint's default when ``max_tokens`` is omitted (None:
        the rest of the context)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        room = self.max_model_len - prompt_len
        if "max_tokens" in kw:
            max_tokens = kw["max_tokens"]
            if (
                isinstance(max_tokens, bool)
                or not isinstance(max_tokens, int)
                or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
            ):
                raise InvalidRequest("max_tokens", f"must be an integer in [1, {MAX_TOKENS_LIMIT}], got {max_tokens!r}")
            if max_tokens > room:
                raise InvalidRequest(
                    "max_tokens",
                    f"{max_tokens} tokens requested but the prompt ({prompt_len} tokens) leaves {room} of the "
                    f"model's {self.max_model_len}-token context",
                )
        else:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        kw["max_tokens"] = max_tokens
        checks = {
            "temperature": lambda v: _num(v) and 0 <= v <= 100,
            "top_p": lambda v: _num(v) and 0 < v <= 1,
            "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
            "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "logprobs": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 20,
            "ignore_eos": lambda v: isinstance(v, bool),
            "allow_speculation": lambda v: isinstance(v, bool),
        }
        for name, ok in checks.items():
            if name in kw and not ok(kw[name]):
                raise InvalidRequest(name, f"invalid value {kw[name]!r}")
        stop = kw.get("stop", ())
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop) or len(stop) > 16:
            raise InvalidRequest("stop", "must be up to 16 non-empty strings")
        kw["stop"] = stop
        ids = tuple(kw.get("stop_token_ids", ()))
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.limits.vocab_size for t in ids):
            raise InvalidRequest("stop_token_ids", "every id must be inside the vocabulary")
        kw["stop_token_ids"] = ids
        unknown = set(kw) - {"max_tokens", "stop", "stop_token_ids", *checks}
        if unknown:
            raise InvalidRequest(sorted(unknown)[0], "unknown sampling parameter")
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise InvalidRequest("sampling", str(e)) from e

    # ------------------------------------------------------------ serving
    def new_request_id(self) -> str:
        return f"req-{uuid.uuid4().hex[:12]}-{next(self._ids)}"

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout_s: float | None = None,
        journal_key: str | None = None,
        origin: str = "router",
    ) -> AsyncIterator[Delta]:
        """Run one request; deltas in order, the last with finish_reason and usage.

        ``journal_key``: the id clients resume it by (default: its request id); ``origin``:
        who started it ("grpc" | "completion" | "chat"), for Resume's rendering. Leaving the
        iteration early (client cancel) aborts the request everywhere.
        """
        admission = _Admission(self, len(prompt_ids))
        admission.start()
        rid = request_id or self.new_request_id()
        spec = RequestSpec(rid, prompt_ids, params)
        gen = self.router.generate(spec, key=journal_key or rid, origin=origin)
        async for delta in self._deltas(gen, rid, len(prompt_ids), params, timeout_s, [], admission):
            yield delta

    async def resume(self, key: str, cursor: int, timeout_s: float | None = None) -> Resumed:
        """The request journaled under ``key`` from token ``cursor`` on (module docstring):
        looked up now, streamed by iterating ``Resumed.deltas``.

        Raises UnknownRequestId, InvalidRequest("cursor") for a cursor past what was
        generated (or "request_id" for a trimmed journal), JournalUnavailable while the
        journal cannot be read, Overloaded when a continuation finds the server full. The
        deltas raise what ``generate``'s do.
        """
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise InvalidRequest("cursor", f"must be an integer >= 0, got {cursor!r}")
        stats = self.router.stats
        record = None
        ledger = self.router.live(key)
        if ledger is None:
            try:
                record = await self.router.store.journal_load(key)
            except StoreUnavailable as e:
                raise JournalUnavailable(f"the request journal cannot be read now: {e}", self.retry_after_s) from e
            ledger = self.router.live(key)  # it may have been resumed by someone else meanwhile
        if ledger is not None:
            if cursor > len(ledger.token_ids):
                raise InvalidRequest("cursor", f"{cursor} is past the {len(ledger.token_ids)} tokens generated so far")
            stats.resumed["live"] += 1
            spec = ledger.spec
            prompt_len = len(spec.prompt_token_ids)
            admission = _Admission(self, prompt_len)  # started only on a take-over
            gen = self._follow(ledger, key, cursor, admission)
            deltas = self._deltas(gen, key, prompt_len, spec.params, timeout_s, ledger.token_ids[:cursor], admission)
            return Resumed(ledger.origin, prompt_len, deltas)
        if record is None:
            raise UnknownRequestId(f"request_id: no request {key!r} in the journal (never started, or expired)")
        if not record.complete:
            raise InvalidRequest("request_id", f"the journal of {key!r} was trimmed (state.journal_max_entries)")
        tokens = list(record.token_ids)
        if cursor > len(tokens):
            raise InvalidRequest("cursor", f"{cursor} is past the {len(tokens)} tokens generated")
        spec = record.spec
        prompt_len = len(spec.prompt_token_ids)
        if record.completed:
            end = record.end
            head = StreamChunk(
                tokens[cursor:], [], True, end.finish_reason, end.error, num_cached_tokens=end.num_cached_tokens
            )
            stats.resumed["replayed"] += 1
            deltas = self._deltas(_one(head), key, prompt_len, spec.params, timeout_s, tokens[:cursor], None)
            return Resumed(spec.origin, prompt_len, deltas)
        admission = _Admission(self, prompt_len, untracked=len(tokens) - cursor)
        admission.start()
        stats.resumed["continued"] += 1
        run = RequestSpec(self.new_request_id(), list(spec.prompt_token_ids), spec.params)
        gen = self.router.generate(run, key=key, origin=spec.origin, resume=record)
        head = StreamChunk(tokens[cursor:])
        chunks = _chain(head, gen) if head.token_ids else gen
        deltas = self._deltas(chunks, key, prompt_len, spec.params, timeout_s, tokens[:cursor], admission)
        return Resumed(spec.origin, prompt_len, deltas)

    async def _follow(
        self, ledger: RequestLedger, key: str, cursor: int, admission: _Admission
    ) -> AsyncIterator[StreamChunk]:
        """A live request from ``cursor`` on. If its owner goes away meanwhile (the call that
        started it was cancelled: the client that lost it is likely the one resuming), the
        follower takes it over: it is admitted as a request of its own (``admission``
        started: counted in flight and in the metrics, refused past ``max_queue``) and
        continued from its tokens so far."""
        async for chunk in ledger.follow(cursor):
            cursor += len(chunk.token_ids)
            if not (chunk.finished and chunk.error == CANCELLED):
                yield chunk
                if chunk.finished:
                    return
                continue
            admission.start()
            if chunk.token_ids:
                yield StreamChunk(chunk.token_ids, chunk.logprobs, num_cached_tokens=chunk.num_cached_tokens)
            record = ledger.record()
            # tokens journaled (staged) but never delivered: the owner was cancelled between
            # the journal write and the delivery; the continuation starts after them
            if len(record.token_ids) > cursor:
                yield StreamChunk(list(record.token_ids[cursor:]))
            self.router.stats.resumed["continued"] += 1
            spec = ledger.spec
            run = RequestSpec(self.new_request_id(), list(spec.prompt_token_ids), spec.params)
            gen = self.router.generate(run, key=key, origin=ledger.origin, resume=record)
            try:
                async for chunk in gen:
                    yield chunk
            finally:
                await gen.aclose()
            return

    async def in_flight(self, key: str) -> bool:
        """Whether a request journaled under ``key`` is in flight: running here, or started
        by a process that died before it ended (Resume continues it). A journal that cannot
        be read counts as not in flight (serving goes on without it)."""
        ledger = self.router.live(key)
        if ledger is not None:
            return not ledger.finished
        try:
            return await self.router.store.journal_in_flight(key)
        except StoreUnavailable:
            return False

    def _admit(self) -> None:
        if self.inflight >= self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected("overloaded")
            raise Overloaded(
                f"server at capacity ({self.max_queue} requests in flight); retry later", self.retry_after_s
            )

    async def _deltas(
        self,
        gen: AsyncIterator[StreamChunk],
        rid: str,
        prompt_len: int,
        params: SamplingParams,
        timeout_s: float | None,
        prior: list[int],
        admission: _Admission | None,
    ) -> AsyncIterator[Delta]:
        """Deltas of a chunk stream that starts at token ``len(prior)`` (text from there on,
        stop strings cut as the worker does); enforces the deadline; closes ``gen`` at the end
        (which aborts the request unless it finished). ``admission``: the request's count
        (in flight, metrics) while it is started; finished here."""
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        for t in prior:
            detok.append(t)
        deadline = time.monotonic() + min(timeout_s or self.request_timeout_s, self.request_timeout_s)
        usage = Usage(prompt_tokens=prompt_len, completion_tokens=len(prior))
        outcome = "cancelled"  # unless set below: the caller stopped iterating
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeout(f"request {rid} exceeded its deadline")
                try:
                    # asyncio.timeout (not wait_for): runs in this task, so a caller's cancel
                    # can't be swallowed by a chunk arriving at the same moment
                    async with asyncio.timeout(remaining):
                        chunk = await anext(gen)
                except StopAsyncIteration:
                    outcome = "abort"  # the router ended the stream without a finished chunk
                    return
                except TimeoutError as e:
                    raise RequestTimeout(f"request {rid} exceeded its deadline") from e
                except RequestInFlight as e:
                    raise RequestIdInFlight(str(e)) from e
                except WorkersBusy as e:
                    if self.metrics is not None:
                        self.metrics.rejected("workers_busy")
                    raise Overloaded(str(e), self.retry_after_s) from e
                except ValueError as e:
                    raise InvalidRequest("prompt", str(e)) from e
                if admission is not None and admission.started:
                    admission.tokens(len(chunk.token_ids))
                before = len(detok.text)
                for t in chunk.token_ids:
                    detok.append(t)
                text = (detok.final_text if chunk.finished else detok.text)[before:]
                index = usage.completion_tokens
                usage.completion_tokens += len(chunk.token_ids)
                usage.cached_tokens = chunk.num_cached_tokens
                if chunk.finished:
                    outcome = chunk.finish_reason or "abort"
                yield Delta(
                    index=index,
                    token_ids=list(chunk.token_ids),
                    text=text,
                    logprobs=list(chunk.logprobs),
                    finish_reason=chunk.finish_reason if chunk.finished else None,
                    error=chunk.error,
                    usage=usage if chunk.finished else None,
                )
                if chunk.finished:
                    return
        except RequestTimeout:
            outcome = "timeout"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            if admission is not None:
                admission.finish(outcome, usage.cached_tokens)
            await gen.aclose()  # aborts on the workers unless the request finished

    # ------------------------------------------------------------ info
    def healthy(self) -> bool:
        return any(w.healthy and w.role in ("decode", "mixed") for w in self.router.workers.values())

    def health(self) -> Health:
        """Serving (a decode-capable worker is healthy) and the state store's state: a
        degraded store still serves, without durability."""
        h = self.router.store.health()
        return Health(self.healthy(), h.status, h.detail)

    def model_info(self) -> ModelInfo:
        c = self.model_config
        return ModelInfo(
            model=self.model_name,
            architecture=c.architecture,
            vocab_size=self.limits.vocab_size,
            max_model_len=self.max_model_len,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            eos_token_ids=tuple(c.eos_token_ids),
        )

    def server_info(self) -> ServerInfo:
        cluster = self._info() if self._info is not None else self._router_info()
        return ServerInfo(cluster=cluster, inflight=self.inflight, max_queue=self.max_queue)

    def _router_info(self) -> ClusterInfo:
        """Cluster info from the router alone, for a backend built without a cluster's
        ``info()``: the pool configuration is unknown (``pools`` is empty)."""
        r = self.router
        return ClusterInfo(
            model=self.model_name,
            transfer="unknown",
            placement="none",
            pools=(),
            workers=tuple(worker_info(r, wid, w.role, w.role) for wid, w in r.workers.items()),
            requests_in_flight=len(r.requests),
            state=r.store.health(),
        )


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # rejects NaN


async def _one(chunk: StreamChunk) -> AsyncIterator[StreamChunk]:
    yield chunk


async def _chain(head: StreamChunk, gen: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    """``head`` (tokens replayed from the journal), then ``gen``; closing it closes ``gen``."""
    try:
        yield head
        async for chunk in gen:
            yield chunk
    finally:
        await gen.aclose()


__all__ = [
    "Delta",
    "Health",
    "InvalidRequest",
    "JournalUnavailable",
    "RequestIdInFlight",
    "Resumed",
    "UnknownRequestId",
    "ModelInfo",
    "NoWorkerAvailable",
    "Overloaded",
    "RequestTimeout",
    "ServerInfo",
    "ServingBackend",
    "Usage",
]
