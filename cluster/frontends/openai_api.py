"""OpenAI wire format: request models, error bodies, response and stream-chunk builders.

Data and parsing only (pydantic models, dicts, the JSON body reader); the FastAPI app in
``cluster/frontends/http_server.py`` drives it.

Request models are strict (no "5" -> 5 coercion, no NaN/inf) and ignore unknown fields, as
OpenAI clients send fields a server may not know. Fields the server cannot honour with a
non-default value (``n > 1``, ``echo``, penalties, ``logit_bias``, tools, ...) are refused
by ``unsupported_fields`` with a 400 naming the field, never silently ignored.
Extensions beyond the OpenAI API: ``top_k``, ``ignore_eos``, ``allow_speculation``, ``stop_token_ids`` and
``return_token_ids`` (adds ``token_ids`` to each choice / chunk choice).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from cluster.frontends.service import (
    Delta,
    InvalidRequest,
    JournalUnavailable,
    NoWorkerAvailable,
    Overloaded,
    RequestTimeout,
    UnknownRequestId,
    Usage,
)
from engine.request import TokenLogprobs

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered with the OpenAI body ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s  # a refusal: sent as the Retry-After header

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if err.retry_after_s is not None:
        headers["retry-after"] = str(err.retry_after_s)
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


UNAUTHORIZED = ApiError(401, "missing or incorrect API key", "authentication_error", code="invalid_api_key")


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    text = f"{param}: {message}" if param else message
    return ApiError(400, text, "invalid_request_error", param, code)


def backend_error(e: Exception, retry_after_s: int = 1) -> ApiError:
    """ServingBackend's exceptions as OpenAI errors; anything else is a bug: 500, logged.
    Refusals (429, 503 before anything was streamed) carry ``retry_after_s`` (Retry-After)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequest):
        return invalid(e.field, str(e).removeprefix(f"{e.field}: "))
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded", retry_after_s=e.retry_after_s)
    if isinstance(e, NoWorkerAvailable):
        message = str(e) or "no worker available"
        return ApiError(503, message, "server_error", code="service_unavailable", retry_after_s=retry_after_s)
    if isinstance(e, JournalUnavailable):
        return ApiError(503, str(e), "server_error", code="journal_unavailable", retry_after_s=e.retry_after_s)
    if isinstance(e, UnknownRequestId):
        return ApiError(404, str(e), "invalid_request_error", "request_id", "request_not_found")
    if isinstance(e, RequestTimeout):
        return ApiError(408, str(e), "timeout_error", code="timeout")
    log.exception("unexpected error while serving a request", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error")


def worker_failed(error: str) -> ApiError:
    """A request the router ended with an error after it started (a worker died, a transfer failed)."""
    return ApiError(503, f"the request failed on a worker: {error}", "server_error", code="worker_failed")


# --------------------------------------------------------------------------- requests

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool | None = None  # extension
    allow_speculation: bool | None = None  # extension: False keeps speculating workers from drafting for it
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, ignored
    return_token_ids: bool = False  # extension

    def unsupported_fields(self) -> ApiError | None:
        if self.n != 1:
            return invalid("n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                return invalid(name, "is not supported (only 0)")
        if self.logit_bias:
            return invalid("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            return invalid("stream_options", "is only allowed with stream=true")
        return None

    def sampling_fields(self) -> dict[str, Any]:
        """Keyword arguments for ServingBackend.sampling_params (None = backend default)."""
        temperature = self.temperature
        if temperature is not None and 0.0 < temperature < GREEDY_BELOW:
            temperature = 0.0  # 1/temperature would overflow the logits: same as greedy
        if self.top_p is not None and 0.0 < self.top_p < GREEDY_BELOW:
            temperature = 0.0  # keeps only the most likely token: greedy (fp32 would round top_p to 0)
        return {
            "max_tokens": self.max_tokens,
            "temperature": temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "allow_speculation": self.allow_speculation,
        }

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# Temperatures and top_p in (0, GREEDY_BELOW) are served greedily, which is what they mean:
# tinier ones overflow (1/temperature) or underflow (top_p) fp32 in the sampler.
GREEDY_BELOW = 1e-5


# OpenAI's default max_tokens for /v1/completions (chat defaults to the rest of the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class CompletionRequest(_Sampling):
    # A string, token ids, or a list holding exactly one of those (batches are refused).
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None  # omitted: COMPLETIONS_DEFAULT_MAX_TOKENS (OpenAI's default)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported_fields(self) -> ApiError | None:
        if self.echo:
            return invalid("echo", "is not supported")
        if self.best_of not in (None, 1):
            return invalid("best_of", "only best_of=1 is supported")
        if self.suffix:
            return invalid("suffix", "is not supported")
        return super().unsupported_fields()

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise invalid("prompt", f"batches of {len(p)} prompts are not supported; send one prompt per request")
            return p[0]
        return p


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # extra fields (tool_calls, tool_call_id, ...) are kept and handed to the template
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: str = "text"


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # newer name of max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def unsupported_fields(self) -> ApiError | None:
        if self.tools:
            return invalid("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            return invalid("tool_choice", "tool calling is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            return invalid("response_format", "only the 'text' response format is supported")
        if self.top_logprobs is not None and not self.logprobs:
            return invalid("top_logprobs", "requires logprobs=true")
        return super().unsupported_fields()


# Messages for union fields, whose pydantic errors name union members, not the problem.
_UNION_HINTS = {
    "prompt": "must be a string, a list of token ids, or a list holding one of those",
    "stop": "must be a string or a list of strings",
    "content": "must be a string, a list of text parts ({'type': 'text', 'text': ...}) or null",
}
_FIELD_NAMES = {
    name
    for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions, ResponseFormat)
    for name in model.model_fields
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first pydantic error as a 400 whose ``param`` is the field path (messages[0].role)."""
    if not errors:
        return invalid(None, "invalid request body")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = ""
    last = None
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and _IDENT.match(part) and part in _FIELD_NAMES:
            param += f".{part}" if param else part
            last = part
        else:
            break  # a union member tag ('list[int]', 'str') or a dict key: stop here
    if err.get("type") == "missing":
        return invalid(param or None, "field required")
    if err.get("type") in ("model_type", "model_attributes_type", "dict_type") and not param:
        return invalid(None, "request body must be a JSON object")
    message = _UNION_HINTS.get(last or "", err.get("msg", "invalid value")) if len(errors) > 1 else err.get("msg")
    return invalid(param or None, str(message))


async def read_json_body(request: Request, limit: int) -> Any:
    """The request body as parsed JSON (any JSON value; the models check its shape)."""
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", "invalid_request_error", code="body_too_large")
    if not raw.strip():
        raise invalid(None, "request body is empty; expected a JSON object")
    try:
        return json.loads(bytes(raw))
    except RecursionError:
        raise invalid(None, "request body nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, integers beyond the digit limit
        raise invalid(None, f"request body is not valid JSON: {e}") from None


def parse_request(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


# -------------------------------------------------------------------------- responses


def usage_dict(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": max(usage.cached_tokens, 0)},
    }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf


@dataclass
class ResponseBuilder:
    """Builds one request's response body or stream chunks.

    kind "completion": choices[{index, text, logprobs, finish_reason}] with legacy logprobs
    ({tokens, token_logprobs, top_logprobs, text_offset}). kind "chat": message/delta with
    role and content, logprobs as {content: [{token, logprob, bytes, top_logprobs}]}.
    ``logprobs`` is None when the client did not ask for them.
    """

    kind: Literal["completion", "chat"]
    response_id: str
    model: str
    created: int
    token_text: Callable[[int], str]  # one token id -> its text, for logprobs
    logprobs: int | None = None
    token_ids: bool = False
    text_offset: int = 0  # completion text emitted so far (legacy text_offset)

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def _logprobs(self, token_ids: list[int], lps: list[TokenLogprobs], text: str) -> dict | None:
        if self.logprobs is None:
            return None
        lps = lps if len(lps) == len(token_ids) else [TokenLogprobs(t, float("nan")) for t in token_ids]
        if self.kind == "chat":
            return {"content": [self._chat_logprob(lp) for lp in lps]}
        tokens = [self.token_text(lp.token_id) for lp in lps]
        offsets, at = [], self.text_offset
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        self.text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": [{self.token_text(t): _finite(v) for t, v in lp.top.items()} for lp in lps],
            "text_offset": offsets,
        }

    def _chat_logprob(self, lp: TokenLogprobs) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

        top = sorted(lp.top.items(), key=lambda kv: -kv[1])[: self.logprobs or 0]
        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in top]}

    def response(self, text: str, token_ids: list[int], lps: list[TokenLogprobs], finish: str, usage: Usage) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(token_ids, lps, text)
        choice["finish_reason"] = finish
        if self.token_ids:
            choice["token_ids"] = token_ids
        return {**self._head(), "choices": [choice], "usage": usage_dict(usage)}

    def _head(self, chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta: dict | str, delta_obj: Delta | None, finish: str | None, include_usage: bool) -> dict:
        """One stream chunk; ``delta`` is the chat delta dict or the completion text."""
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = delta
        ids = delta_obj.token_ids if delta_obj is not None else []
        lps = delta_obj.logprobs if delta_obj is not None else []
        text = delta_obj.text if delta_obj is not None else ""
        choice["logprobs"] = self._logprobs(ids, lps, text) if ids else None
        choice["finish_reason"] = finish
        if self.token_ids:
            choice["token_ids"] = ids
        out = {**self._head(chunk=True), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._head(chunk=True), "choices": [], "usage": usage_dict(usage)}


__all__ = [
    "ApiError",
    "backend_error",
    "worker_failed",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ResponseBuilder",
    "invalid",
    "parse_request",
    "read_json_body",
    "usage_dict",
]
