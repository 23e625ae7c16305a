"""Benchmark clients without a server: SSE parsing, OpenAI stream folding (httpx.MockTransport),
and the record every send() produces."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.tools.bench.clients import (
    BenchClient,
    OpenAIBenchClient,
    ServerInfo,
    StreamError,
    apply_completion_event,
    make_client,
    openai_base_url,
    parse_sse_line,
)
from cluster.tools.bench.metrics import RequestRecord
from cluster.tools.bench.workloads import BenchRequest

REQ = BenchRequest([5, 6, 7], 3, 4)


def test_openai_base_url():
    assert openai_base_url("localhost:8000") == "http://localhost:8000"
    assert openai_base_url("http://h:1/v1/") == "http://h:1"
    assert openai_base_url("https://api.example.com/v1") == "https://api.example.com"


def test_parse_sse_line():
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None and parse_sse_line("event: x") is None
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line('data: {"a": 1}') == {"a": 1} == parse_sse_line('data:{"a": 1}')
    for bad in ("data: nope", "data: [1, 2]"):
        with pytest.raises(StreamError):
            parse_sse_line(bad)


def test_completion_events_count_token_ids_else_text_chunks():
    rec = RequestRecord(prompt_len=3, expected_output=4)
    assert apply_completion_event({"choices": [{"text": "ab", "token_ids": [1, 2]}]}, rec, 1.0) is None
    apply_completion_event({"choices": [{"text": "c"}]}, rec, 1.5)  # no ids: one token per text chunk
    apply_completion_event({"choices": [{"text": "", "token_ids": []}]}, rec, 1.7)  # nothing new: not a chunk
    assert apply_completion_event({"choices": [{"text": "", "finish_reason": "length"}]}, rec, 2.0) == "length"
    apply_completion_event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}, rec, 2.1)
    assert rec.chunks == [(1.0, 2), (1.5, 1)]
    assert (rec.prompt_len, rec.output_len, rec.end) == (9, 4, 2.1)
    with pytest.raises(StreamError, match="worker died"):
        apply_completion_event({"error": {"message": "worker died"}}, rec, 3.0)


def sse(*events) -> bytes:
    return "".join(f"data: {json.dumps(e) if isinstance(e, dict) else e}\n\n" for e in events).encode()


def mock_server(status: int = 200, body: bytes = b"", seen: list | None = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m1", "max_model_len": 64}]})
        assert request.url.path == "/v1/completions"
        if seen is not None:
            seen.append((dict(request.headers), json.loads(request.content)))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


def run(coro):
    return asyncio.run(coro)


def test_openai_client_streams_and_records():
    seen: list = []
    body = sse(
        {"choices": [{"text": "a", "token_ids": [11], "finish_reason": None}], "usage": None},
        {"choices": [{"text": "bc", "token_ids": [12, 13], "finish_reason": None}], "usage": None},
        {"choices": [{"text": "d", "token_ids": [14], "finish_reason": None}], "usage": None},
        {"choices": [{"text": "", "token_ids": [], "finish_reason": "length"}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        "[DONE]",
    )

    async def go():
        c = OpenAIBenchClient("http://x/v1", api_key="k", transport=mock_server(body=body, seen=seen))
        try:
            info = await c.info()
            return info, await c.send(REQ, {"temperature": 0.0, "ignore_eos": True})
        finally:
            await c.close()

    info, rec = run(go())
    assert info == ServerInfo("m1", None, 64)
    assert rec.success and rec.error == ""
    assert [k for _, k in rec.chunks] == [1, 2, 1] and rec.output_len == 4 and rec.prompt_len == 3
    assert rec.start <= rec.chunks[0][0] <= rec.end
    headers, payload = seen[0]
    assert headers["authorization"] == "Bearer k"
    assert payload["model"] == "m1" and payload["prompt"] == [5, 6, 7] and payload["max_tokens"] == 4
    assert payload["stream"] and payload["stream_options"] == {"include_usage": True} and payload["ignore_eos"]


@pytest.mark.parametrize(
    "status, body, match",
    [
        (429, b'{"error": {"message": "busy"}}', "HTTP 429"),
        (200, sse({"choices": [{"text": "a"}]}, {"error": {"message": "worker died"}}), "worker died"),
        (200, sse({"choices": [{"text": "a"}]}, "[DONE]"), "finish_reason None"),  # cut short
        (200, sse({"choices": [{"text": "", "finish_reason": "abort"}]}), "finish_reason 'abort'"),
    ],
)
def test_openai_failures_are_recorded_not_raised(status, body, match):
    async def go():
        c = OpenAIBenchClient("x:1", model="m", transport=mock_server(status, body))
        try:
            return await c.send(REQ, {})
        finally:
            await c.close()

    rec = run(go())
    assert not rec.success and match in rec.error and rec.end >= rec.start > 0


class Scripted(BenchClient):
    name = "scripted"

    def __init__(self, chunks, reason="stop", raise_after=None):
        self.chunks, self.reason, self.raise_after = chunks, reason, raise_after

    async def info(self) -> ServerInfo:
        return ServerInfo("m")

    async def _stream(self, req, sampling, rec):
        for i, k in enumerate(self.chunks):
            if i == self.raise_after:
                raise ConnectionError("reset")
            rec.add_chunk(rec.start + 0.1 * (i + 1), k)
            rec.end = rec.start + 0.1 * (i + 1)
        return self.reason

    async def close(self) -> None:
        pass


def test_send_counts_tokens_when_the_server_reports_no_usage():
    rec = run(Scripted([1, 2, 1]).send(REQ, {}))
    assert rec.success and rec.output_len == 4 and rec.ttft == pytest.approx(0.1) and rec.e2el == pytest.approx(0.3)


def test_send_records_errors_with_partial_tokens():
    rec = run(Scripted([1, 1, 1], raise_after=2).send(REQ, {}))
    assert not rec.success and rec.error == "ConnectionError: reset" and rec.output_len == 2


def test_make_client():
    c = make_client("openai", "h:1", model="m")
    assert isinstance(c, OpenAIBenchClient) and c.base_url == "http://h:1" and c.model == "m"
    run(c.close())
    with pytest.raises(ValueError, match="unknown backend"):
        make_client("carrier-pigeon", "h:1")
