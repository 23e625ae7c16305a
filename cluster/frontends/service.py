"""ServingBackend: what every frontend (gRPC, OpenAI HTTP, in-process) calls.

It turns user input into a validated RequestSpec (tokenizing text, checking every field
with a message naming it against the limits the workers reported: vocabulary, context
length, KV capacity), admits it under a bounded in-flight limit, runs it through the
Router, turns token ids into text deltas (cutting at stop strings exactly as the decode
worker does) and enforces the request deadline. Frontends map its exceptions to status
codes: InvalidRequest -> INVALID_ARGUMENT / 400, Overloaded -> RESOURCE_EXHAUSTED / 429,
NoWorkerAvailable -> UNAVAILABLE / 503, RequestTimeout -> DEADLINE_EXCEEDED / 408.

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
from cluster.control.router import Router
from cluster.control.routing import NoWorkerAvailable
from cluster.frontends.chat_template import ChatTemplate
from engine.config import ModelConfig
from engine.models.gguf import STAMP_FILE, resolve_model_path
from engine.request import SamplingParams, TokenLogprobs
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.types import RequestSpec, WorkerLimits

if TYPE_CHECKING:
    from cluster.metrics.registry import Metrics

MAX_TOKENS_LIMIT = 1 << 20


class InvalidRequest(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Overloaded(RuntimeError):
    pass


class RequestTimeout(TimeoutError):
    pass


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
    ):
        self.router = router
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
    ) -> AsyncIterator[Delta]:
        """Run one request; deltas in order, the last with finish_reason and usage.

        Leaving the iteration early (client cancel) aborts the request everywhere.
        """
        if self.inflight >= self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected("overloaded")
            raise Overloaded(f"server at capacity ({self.max_queue} requests in flight); retry later")
        rid = request_id or self.new_request_id()
        spec = RequestSpec(rid, prompt_ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        deadline = time.monotonic() + min(timeout_s or self.request_timeout_s, self.request_timeout_s)
        usage = Usage(prompt_tokens=len(prompt_ids))
        self.inflight += 1
        tracker = self.metrics.track(len(prompt_ids)) if self.metrics is not None else None
        outcome = "cancelled"  # unless set below: the caller stopped iterating
        gen = self.router.generate(spec)
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
                except ValueError as e:
                    raise InvalidRequest("prompt", str(e)) from e
                if tracker is not None:
                    tracker.tokens(len(chunk.token_ids))
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
            if tracker is not None:
                tracker.finish(outcome, usage.cached_tokens)
            self.inflight -= 1
            await gen.aclose()  # aborts on the workers unless the request finished

    # ------------------------------------------------------------ info
    def healthy(self) -> bool:
        return any(w.healthy and w.role in ("decode", "mixed") for w in self.router.workers.values())

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
        )


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # rejects NaN


__all__ = [
    "Delta",
    "InvalidRequest",
    "ModelInfo",
    "NoWorkerAvailable",
    "Overloaded",
    "RequestTimeout",
    "ServerInfo",
    "ServingBackend",
    "Usage",
]
