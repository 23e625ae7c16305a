"""Fuzzing the OpenAI HTTP frontend with malformed and extreme request bodies (hypothesis).

Every answer must be a 2xx with a well-formed body (JSON completion or an SSE stream ending
in ``data: [DONE]``) or a 4xx with the OpenAI error body; never a 5xx (every worker stays
healthy here, so not even 503). Afterwards the server still serves and every KV pool is
back to full. The model's context is 256 tokens, so an accepted request is short.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.http_server import HttpFrontend
from cluster.frontends.service import ServingBackend

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 4, "num_blocks": 80, "max_num_batched_tokens": 64}  # 320 tokens > the 256-token context
VOCAB = 512
MODEL = "tiny-fuzz"


class FuzzServer:
    """LocalCluster + one HttpFrontend on an event loop in a background thread."""

    def __init__(self, model_dir: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-fuzz-loop", daemon=True)
        self.thread.start()
        self.cluster, self.backend, self.frontend = self.call(self._start(model_dir))
        self.url = f"http://127.0.0.1:{self.frontend.port}"

    async def _start(self, model_dir: str) -> tuple[LocalCluster, ServingBackend, HttpFrontend]:
        pools = (PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE))
        config = ServeConfig(model_dir, pools, RouterConfig(short_prompt_threshold=8), TransferConfig(kind="loopback"))
        cluster = await LocalCluster(config).start()
        backend = ServingBackend.from_model_dir(cluster.router, model_dir, max_queue=16, request_timeout_s=20)
        backend.model_name = MODEL
        frontend = HttpFrontend(backend, "127.0.0.1", 0, graceful_shutdown_s=1.0)
        await frontend.start()
        return cluster, backend, frontend

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def assert_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            loads = {wid: w.stats().engine for wid, w in self.cluster.workers.items()}
            assert {ld.total_kv_blocks for ld in loads.values()} == {ENGINE["num_blocks"]}, loads  # not 0 of 0
            full = all(ld.free_kv_blocks == ld.total_kv_blocks and not ld.running_requests for ld in loads.values())
            if full and not self.backend.inflight and not self.cluster.router.requests:
                return
            assert time.monotonic() < deadline, f"not idle: {loads}, in flight {self.backend.inflight}"
            time.sleep(0.01)  # poll interval

    def close(self) -> None:
        self.call(self.frontend.stop())
        self.cluster.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[FuzzServer]:
    s = FuzzServer(tiny_checkpoint("llama", max_position_embeddings=256))
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------ strategies

HUGE_INTS = st.sampled_from([2**31, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**300])
EXTREME_FLOATS = st.sampled_from([1e-300, 5e-324, 1e-6, 1e308, -1e308, -0.0, float("nan"), float("inf"), -float("inf")])
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), HUGE_INTS, st.floats(), EXTREME_FLOATS, st.text(max_size=12)
)
JUNK = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)

# Valid values, pushed to their extremes (every one of them must be served).
IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=250)  # up to the 256-token context
TEXT_PROMPT = st.text(min_size=1, max_size=50)  # <= 4 bytes (byte-level tokens) per character
VALID = {
    "model": st.sampled_from([MODEL, None]),
    # small enough that any prompt here (< 252 tokens) leaves room: a larger explicit
    # max_tokens than the context leaves is refused (test_max_tokens_beyond_the_context_is_400)
    "max_tokens": st.one_of(st.integers(1, 4), st.none()),
    "temperature": st.one_of(st.floats(0, 100), st.sampled_from([0.0, 5e-324, 1e-300, 1e-30, 1e-5, 100.0])),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1e-40, 1e-7, 1.0])),
    "top_k": st.one_of(st.integers(-1, VOCAB + 5), HUGE_INTS.filter(lambda v: v > 0)),
    "seed": st.one_of(st.integers(), HUGE_INTS),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=16)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=8),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "n": st.just(1),
    "user": st.text(max_size=10),
    "presence_penalty": st.just(0.0),
    "return_token_ids": st.booleans(),
}
VALID_COMPLETION = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            TEXT_PROMPT, IDS, st.lists(IDS, min_size=1, max_size=1), st.lists(TEXT_PROMPT, min_size=1, max_size=1)
        )
    },
    optional={**VALID, "logprobs": st.integers(0, 20), "echo": st.just(False)},
)
VALID_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": st.one_of(
            st.text(max_size=12),
            st.none(),
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=6)}), max_size=2),
        ),
    }
)
VALID_CHAT = st.fixed_dictionaries(
    {"messages": st.lists(VALID_MESSAGE, min_size=1, max_size=4)},
    optional={
        **VALID,
        "max_completion_tokens": st.integers(1, 4),
        "logprobs": st.booleans(),
        "response_format": st.just({"type": "text"}),
    },
)


@st.composite
def valid_bodies(draw: st.DrawFn, path: str) -> dict:
    body = draw(VALID_COMPLETION if path == "/v1/completions" else VALID_CHAT)
    if body.get("stream"):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if body.get("logprobs") is True:
        body["top_logprobs"] = draw(st.integers(0, 20))
    return body


@st.composite
def requests_(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(path, raw body, must succeed): valid extremes, valid bodies with one field or key broken, junk
    documents, deep nesting, numbers beyond the parser's limits, truncated or random bytes."""
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    shape = draw(
        st.sampled_from(["valid"] * 4 + ["one_bad"] * 3 + ["junk_keys", "document", "nested", "digits", "bytes"])
    )
    if shape == "bytes":
        return path, draw(st.binary(max_size=64)), False
    if shape == "digits":  # an integer beyond Python's int-parsing digit limit
        return path, b'{"prompt": "x", "max_tokens": ' + b"9" * draw(st.integers(4000, 6000)) + b"}", False
    if shape == "nested":  # deeper than the JSON parser's recursion limit, or not
        depth = draw(st.sampled_from([50, 500, 5000, 100_000]))
        nested = b"[" * depth + b"]" * depth
        if path == "/v1/completions":
            return path, b'{"prompt": "x", "user": ' + nested + b"}", False
        return path, b'{"messages": [{"role": "user", "content": "x", "tool_calls": ' + nested + b"}]}", False
    if shape == "document":
        body: Any = draw(JUNK)
    else:
        body = draw(valid_bodies(path))
        if shape == "one_bad":
            names = sorted({*body, "prompt", "messages", "max_tokens", "temperature", "logprobs", "stream_options"})
            body[draw(st.sampled_from(names))] = draw(
                st.one_of(JUNK, EXTREME_FLOATS, HUGE_INTS, st.text(max_size=5), st.integers(-5, 5))
            )
        elif shape == "junk_keys":
            body.update(draw(st.dictionaries(st.text(max_size=8), JUNK, max_size=3)))
    raw = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity literals, as sloppy clients send
    if draw(st.integers(0, 15)) == 0:
        cut = draw(st.integers(0, len(raw) - 1))
        return path, raw[:cut], False  # truncated
    return path, raw, shape == "valid"


# ----------------------------------------------------------------------------- checks


def _check_answer(r: httpx.Response, path: str) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    assert r.status_code != 408, "a short request ran into the deadline (a worker stalled)"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        return
    assert r.status_code == 200
    chat = "chat" in path
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]" and len(events) >= 2, events
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        assert {c["object"] for c in chunks} == {"chat.completion.chunk" if chat else "text_completion"}
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
        return
    body = r.json()
    assert body["object"] == ("chat.completion" if chat else "text_completion")
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["message"]["content"] if chat else choice["text"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["prompt_tokens"] < 256 and usage["completion_tokens"] >= 1


def test_fuzzed_bodies_get_well_formed_answers_and_leak_nothing(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(requests_())
        def post(request: tuple[str, bytes, bool]) -> None:
            path, raw, must_succeed = request
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            _check_answer(r, path)
            assert r.status_code == 200 or not must_succeed, f"a valid request was refused: {r.text[:500]}"

        post()
        server.assert_idle()
        body = {"model": MODEL, "prompt": "still serving?", "max_tokens": 4, "ignore_eos": True}
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4, ok.text
        assert http.get("/health").status_code == 200
    server.assert_idle()


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "temperature": 1e-300},  # 1/temperature overflows fp32: must be served greedily
        {"prompt": [VOCAB - 1] * 255, "ignore_eos": True},  # the default max_tokens, clamped to 1 token left
        {"prompt": "x", "top_k": 10**12, "top_p": 5e-324, "seed": -(2**70)},
        {"messages": [{"role": "user", "content": "x" * 40}], "stream": True, "logprobs": True, "top_logprobs": 20},
    ],
)
def test_extreme_but_valid_requests_are_served(server, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    _check_answer(r, path)
    if len(body.get("prompt", "")) == 255:  # exactly the one position the context has left
        assert (r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]) == (1, "length")
    server.assert_idle()


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/completions", {"prompt": [VOCAB - 1] * 250, "max_tokens": 7}, "max_tokens"),  # 250 + 7 > 256
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2**20}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 300},
            "max_completion_tokens",
        ),
    ],
)
def test_max_tokens_beyond_the_context_is_400(server, path, body, field):
    """An explicit max_tokens that the prompt leaves no room for is refused, naming the field
    the client sent (as OpenAI and vLLM do); nothing is silently clamped."""
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "context" in err["message"], err
    server.assert_idle()
