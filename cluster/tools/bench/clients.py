"""Benchmark clients: send one request, timestamp every token-carrying message.

Backends:
- ``grpc``: the splitserve SDK (cluster.client.AsyncClient) against ``HOST:PORT``;
- ``openai``: POST /v1/completions with SSE streaming (``stream_options.include_usage``)
  against any OpenAI-compatible server at ``URL`` (with or without a trailing ``/v1``). It
  also sends ``return_token_ids`` and ``ignore_eos`` (splitserve and vLLM extensions; other
  servers ignore them): with token ids a chunk's token count is exact, without them each
  text chunk counts as one token and the final usage gives the total.

Clients never retry: a failed request is recorded as failed (``RequestRecord.error``).
Create, use and close a client on one event loop.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import httpx

from cluster.client import AsyncClient
from cluster.tools.bench.metrics import RequestRecord
from cluster.tools.bench.workloads import BenchRequest

BACKENDS = ("grpc", "openai")
COMPLETE = ("stop", "length")  # finish reasons of a completed request ("abort" is a failure)


@dataclass(frozen=True)
class ServerInfo:
    model: str
    vocab_size: int | None = None  # None: the server does not say
    max_model_len: int | None = None


class StreamError(RuntimeError):
    """The server reported an error, or the stream ended without a finish reason."""


class BenchClient(ABC):
    name: str

    @abstractmethod
    async def info(self) -> ServerInfo: ...

    @abstractmethod
    async def _stream(self, req: BenchRequest, sampling: dict[str, Any], rec: RequestRecord) -> str | None:
        """Run the request, filling ``rec`` (chunks, end, output_len, prompt_len); the finish reason."""

    @abstractmethod
    async def close(self) -> None: ...

    async def send(self, req: BenchRequest, sampling: dict[str, Any]) -> RequestRecord:
        """One request; errors end up in the record, cancellation propagates."""
        rec = RequestRecord(prompt_len=req.prompt_len, expected_output=req.output_len)
        rec.start = time.perf_counter()
        try:
            reason = await self._stream(req, sampling, rec)
            if reason not in COMPLETE:
                raise StreamError(f"stream ended with finish_reason {reason!r}")
            rec.success = True
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"
            rec.end = time.perf_counter()
        if not rec.output_len:
            rec.output_len = sum(k for _, k in rec.chunks)
        return rec


class GrpcBenchClient(BenchClient):
    name = "grpc"

    def __init__(self, target: str, api_key: str | None = None, timeout_s: float | None = None):
        self.target = target
        self._client = AsyncClient(target, api_key=api_key, timeout=timeout_s, max_retries=0)

    async def info(self) -> ServerInfo:
        m = await self._client.model_info()
        return ServerInfo(m.model, m.vocab_size or None, m.max_model_len or None)

    async def _stream(self, req: BenchRequest, sampling: dict[str, Any], rec: RequestRecord) -> str | None:
        reason = None
        async for chunk in self._client.stream(req.prompt, max_tokens=req.output_len, **sampling):
            now = time.perf_counter()
            rec.add_chunk(now, len(chunk.token_ids))
            rec.end = now
            if chunk.usage is not None:
                rec.prompt_len = chunk.usage.prompt_tokens or rec.prompt_len
                rec.output_len = chunk.usage.completion_tokens
                rec.cached_tokens = chunk.usage.cached_tokens
            reason = chunk.finish_reason or reason
        return reason

    async def close(self) -> None:
        await self._client.close()


def openai_base_url(url: str) -> str:
    """'host:8000' -> 'http://host:8000'; a trailing '/' or '/v1' is dropped."""
    base = url.strip().rstrip("/")
    if "://" not in base:
        base = "http://" + base
    return base.removesuffix("/v1")


def parse_sse_line(line: str) -> dict | str | None:
    """One SSE line: the JSON event (dict), "[DONE]", or None for blank lines, comments and
    other fields. Raises StreamError for a data line that is not JSON."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return payload
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as e:
        raise StreamError(f"bad SSE data {payload[:200]!r}: {e}") from None
    if not isinstance(event, dict):
        raise StreamError(f"SSE event is not an object: {payload[:200]!r}")
    return event


def apply_completion_event(event: dict, rec: RequestRecord, now: float) -> str | None:
    """Fold one /v1/completions stream event into ``rec``; its finish reason, if any."""
    if "error" in event:
        err = event["error"]
        raise StreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
    reason = None
    for choice in event.get("choices") or []:
        ids = choice.get("token_ids")
        rec.add_chunk(now, len(ids) if isinstance(ids, list) else int(bool(choice.get("text"))))
        reason = choice.get("finish_reason") or reason
    usage = event.get("usage")
    if isinstance(usage, dict):
        rec.prompt_len = usage.get("prompt_tokens") or rec.prompt_len
        rec.output_len = usage.get("completion_tokens", rec.output_len)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            rec.cached_tokens = details["cached_tokens"]
    rec.end = now
    return reason


class OpenAIBenchClient(BenchClient):
    name = "openai"

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float | None = None,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ):
        self.base_url = openai_base_url(url)
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            transport=transport,
        )

    async def info(self) -> ServerInfo:
        r = await self._http.get("/v1/models")
        if r.status_code != 200:
            raise StreamError(f"GET {self.base_url}/v1/models: HTTP {r.status_code}: {r.text[:300]}")
        cards = r.json().get("data") or []
        card = next((c for c in cards if c.get("id") == self.model), cards[0] if cards else None)
        if card is None:
            raise StreamError(f"{self.base_url}/v1/models lists no model")
        if self.model is None:
            self.model = card["id"]
        return ServerInfo(self.model, card.get("vocab_size"), card.get("max_model_len"))

    async def _stream(self, req: BenchRequest, sampling: dict[str, Any], rec: RequestRecord) -> str | None:
        body = {
            "prompt": req.prompt,
            "max_tokens": req.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            **sampling,
        }
        if self.model is not None:
            body["model"] = self.model
        reason = None
        async with self._http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                event = parse_sse_line(line)
                if event == "[DONE]":
                    break
                if isinstance(event, dict):
                    reason = apply_completion_event(event, rec, time.perf_counter()) or reason
        return reason

    async def close(self) -> None:
        await self._http.aclose()


def make_client(
    backend: str, target: str, api_key: str | None = None, timeout_s: float | None = None, model: str | None = None
) -> BenchClient:
    if backend == "grpc":
        return GrpcBenchClient(target, api_key, timeout_s)
    if backend == "openai":
        return OpenAIBenchClient(target, api_key, timeout_s, model)
    raise ValueError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
