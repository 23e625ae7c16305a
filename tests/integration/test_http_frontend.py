"""OpenAI-compatible HTTP frontend over a LocalCluster, driven by the official ``openai``
client through real sockets.

The cluster and several frontends (plain, API-keyed, max_queue=1, tiny deadline, strict chat
template) share one event loop in a background thread; the tests call them synchronously
from the main thread, as any HTTP client would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.chat_template import ChatTemplate, ChatTemplateError, read_tokenizer_config
from cluster.frontends.http_server import HttpFrontend
from cluster.frontends.service import ServingBackend
from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 4, "num_blocks": 600, "max_num_batched_tokens": 64}  # 2400 tokens: any request fits
KEY = "sk-test-key"
LONG = 1900  # max_tokens of requests that must still be running when the test acts (~3 s of decode)
PROMPT = "The quick brown fox jumps over the lazy dog, then it naps in the warm afternoon sun"
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must come from the user') }}"
    "{% endif %}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
)


class RecordingBackend(ServingBackend):
    """Records how each request's generator ended: "finished" (final delta seen) or "closed"."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}

    async def generate(self, prompt_ids, params, request_id=None, timeout_s=None, **kw):
        finished = False
        try:
            async for delta in super().generate(prompt_ids, params, request_id, timeout_s, **kw):
                finished = delta.finish_reason is not None
                yield delta
        finally:
            self.outcomes[request_id] = "finished" if finished else "closed"


class Served:
    """LocalCluster + frontends on an event loop running in a background thread."""

    def __init__(self, model: str):
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-test-loop", daemon=True)
        self.thread.start()
        self.cluster: LocalCluster = self.call(self._cluster())
        self.name = "tiny-llama"
        self.main = self.backend(max_queue=64)
        self.frontends: dict[str, tuple[RecordingBackend, HttpFrontend]] = {}
        for label, backend, key in [
            ("main", self.main, None),
            ("keyed", self.backend(), KEY),
            ("tight", self.backend(max_queue=1), None),
            ("deadline", self.backend(request_timeout_s=0.3), None),
            ("strict", self.backend(template=STRICT_TEMPLATE), None),
        ]:
            fe = HttpFrontend(backend, "127.0.0.1", 0, api_key=key, graceful_shutdown_s=1.0)
            self.call(fe.start())
            self.frontends[label] = (backend, fe)

    async def _cluster(self) -> LocalCluster:
        pools = (PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE))
        config = ServeConfig(self.model, pools, RouterConfig(short_prompt_threshold=8), TransferConfig(kind="loopback"))
        return await LocalCluster(config).start()

    def backend(self, template: str | None = None, **kw: Any) -> RecordingBackend:
        tok = Tokenizer(self.model)
        chat = ChatTemplate.from_model_dir(self.model)
        if template is not None:  # the model's special tokens, another template
            chat = ChatTemplate.from_tokenizer_config({**read_tokenizer_config(self.model), "chat_template": template})
        return RecordingBackend(
            self.cluster.router, tok, ModelConfig.from_hf_dir(self.model), self.name, chat_template=chat, **kw
        )

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def url(self, label: str = "main") -> str:
        return f"http://127.0.0.1:{self.frontends[label][1].port}"

    def client(self, label: str = "main", key: str = "unused", timeout: float = 60.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(label) + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def assert_idle(self, timeout: float = 10.0) -> None:
        """Every worker's KV pool back to full (all ENGINE["num_blocks"] blocks free: 0 of 0 is
        not full), nothing running or in flight anywhere. Release is asynchronous (aborts and
        transfer completions), so poll until a deadline."""
        deadline = time.monotonic() + timeout
        while True:
            loads = {wid: w.stats().engine for wid, w in self.cluster.workers.items()}
            assert {ld.total_kv_blocks for ld in loads.values()} == {ENGINE["num_blocks"]}, loads
            busy = [wid for wid, ld in loads.items() if ld.free_kv_blocks != ld.total_kv_blocks]
            busy += [wid for wid, ld in loads.items() if ld.running_requests]
            inflight = [label for label, (backend, _) in self.frontends.items() if backend.inflight]
            if not busy and not inflight and not self.cluster.router.requests:
                return
            assert time.monotonic() < deadline, f"not idle: workers {busy}, backends {inflight}, loads {loads}"
            time.sleep(0.01)  # poll interval

    def set_decode_health(self, healthy: bool) -> None:
        async def apply() -> None:
            for wid, w in self.cluster.router.workers.items():
                if w.role == "decode":
                    if healthy:
                        w.healthy = True
                    else:
                        self.cluster.router.mark_unhealthy(wid)

        self.call(apply())

    def close(self) -> None:
        for _, fe in self.frontends.values():
            self.call(fe.stop())
        self.cluster.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tiny_checkpoint) -> Iterator[Served]:
    s = Served(tiny_checkpoint("llama"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Greedy token ids from the colocated engine.LLM for the same prompt ids."""
    llm = LLM(tiny_checkpoint("llama"), **ENGINE)

    def run(ids: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return llm.generate([ids], params)[0].token_ids

    return run


def _extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {})[name]


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize("prompt_kind", ["text", "ids_short", "ids_long", "nested_ids"])
def test_completion_greedy_equals_engine_llm(served, reference, prompt_kind):
    tok = served.main.tokenizer
    ids = {"ids_short": [5, 17, 300], "ids_long": list(range(3, 60))}.get(prompt_kind, tok.encode(PROMPT))
    prompt: Any = {"text": PROMPT, "nested_ids": [ids]}.get(prompt_kind, ids)
    out = served.client().completions.create(
        model=served.name,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = out.choices[0]
    assert _extra(choice, "token_ids") == reference(ids, 12)
    assert choice.finish_reason == "length" and out.object == "text_completion" and out.model == served.name
    assert out.id.startswith("cmpl-") and isinstance(choice.text, str)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(ids),
        12,
        len(ids) + 12,
    )
    served.assert_idle()


def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(served):
    """A repeated prompt is prefilled from the prefill worker's prefix cache: every full
    block but the one holding the last prompt token (40 of 41 tokens here) is reported as
    cached, the first time none is; streamed usage says the same."""
    ids = [(11 * i) % 500 + 3 for i in range(41)]  # a prompt no other test sends
    kw = dict(model=served.name, prompt=ids, max_tokens=1, temperature=0)
    client = served.client()
    first = client.completions.create(**kw).usage
    again = client.completions.create(**kw).usage
    streamed = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))[-1].usage
    assert (first.prompt_tokens, first.prompt_tokens_details.cached_tokens) == (41, 0)
    assert (again.prompt_tokens, again.prompt_tokens_details.cached_tokens) == (41, 40)
    assert streamed.prompt_tokens_details.cached_tokens == 40
    served.assert_idle()


def test_completion_stream_equals_non_stream_with_usage(served):
    client = served.client()
    kw = dict(model=served.name, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    # without include_usage no chunk carries usage
    plain = list(client.completions.create(stream=True, **kw))
    assert all(not c.usage for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_chat_round_trip_uses_the_chat_template(served, reference):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."},
        {"role": "assistant", "content": "Something."},
        {"role": "user", "content": [{"type": "text", "text": "Again, "}, {"type": "text", "text": "please."}]},
    ]
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "Again, please."} for m in messages]
    hf = AutoTokenizer.from_pretrained(served.model)
    ids = hf.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = hf.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    assert ChatTemplate.from_tokenizer_config(served.main.tokenizer.config).render(flat) == text

    client = served.client()
    kw = dict(model=served.name, messages=messages, max_tokens=10, temperature=0.0)
    out = client.chat.completions.create(extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids)
    assert _extra(choice, "token_ids") == reference(list(ids), 10)

    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **kw
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + 10
    served.assert_idle()


def test_logprobs(served):
    client = served.client()
    out = client.completions.create(model=served.name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen <= max(top.values()) + 1e-6  # greedy picked the most likely token
    assert lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


def test_stop_string_cuts_the_text(served):
    client = served.client()
    kw = dict(model=served.name, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=24, **kw).choices[0].text
    stop = next(
        full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    cut = client.completions.create(max_tokens=24, stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(served):
    client = served.client()
    kw = dict(model=served.name, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9)
    extra = {"top_k": 50, "ignore_eos": True, "return_token_ids": True}
    runs = [client.completions.create(seed=seed, extra_body=extra, **kw).choices[0] for seed in (1234, 1234, 99)]
    ids = [_extra(c, "token_ids") for c in runs]
    assert ids[0] == ids[1] and runs[0].text == runs[1].text and len(ids[0]) == 16
    assert ids[2] != ids[0]  # another seed draws another sequence (16 draws from ~50 tokens)


# ------------------------------------------------------------------- models, health


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.name] and models.data[0].object == "model"
    card = served.client().models.retrieve(served.name)
    assert card.id == served.name
    # extra fields a client sizes requests with: the tiny checkpoint's vocabulary and context
    # (config.json: vocab_size 512, max_position_embeddings 2048; the 2400-slot KV pool is larger)
    assert (card.model_extra["vocab_size"], card.model_extra["max_model_len"]) == (512, 2048)
    assert (served.main.model_config.vocab_size, served.main.max_model_len) == (512, 2048)  # what it validates against
    with httpx.Client(base_url=served.url()) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models/not-a-model").status_code == 404
        served.set_decode_health(False)
        try:
            r = http.get("/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
            with pytest.raises(openai.InternalServerError) as e:
                served.client().completions.create(model=served.name, prompt="hi there", max_tokens=2)
            assert e.value.status_code == 503 and e.value.body["code"] == "service_unavailable"
        finally:
            served.set_decode_health(True)
        assert http.get("/health").status_code == 200
    assert served.client().completions.create(model=served.name, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    served.assert_idle()


# ----------------------------------------------------------------------------- errors

_BAD_FIELDS = [
    ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"temperature": -0.5}, "temperature"),
    ("/v1/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/completions", {"top_k": -7}, "top_k"),
    ("/v1/completions", {"logprobs": 50}, "logprobs"),
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"stop": 7}, "stop"),
    ("/v1/completions", {"prompt": [1, 2, 512]}, "prompt"),
    ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 3000}, "prompt"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("path,fields,param", _BAD_FIELDS, ids=[f"{p[1]}" for p in _BAD_FIELDS])
def test_invalid_fields_are_400_naming_the_field(served, path, fields, param):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(served.url() + path, json={"model": served.name, **base, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_error_bodies_for_malformed_requests(served):
    with httpx.Client(base_url=served.url(), timeout=30) as http:
        for body in [
            b"{",
            b"",
            b"[1, 2]",
            b'"text"',
            b'{"prompt": "x",}',
            b"\xff\xfe\x00",
            b'{"prompt":"x","temperature":NaN}',
        ]:
            r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.post("/v1/completions", json={"model": "other-model", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
    # the openai client maps the status to its exception and exposes the error body
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(model=served.name, prompt="hi", max_tokens=-3)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


def test_chat_template_errors_are_400(served):
    client = served.client("strict")
    out = client.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # the prompt is this frontend's template, rendered (not the model's own template)
    rendered = served.main.tokenizer.encode("[user] hi\n[assistant] ", add_special_tokens=False)
    assert out.usage.prompt_tokens == len(rendered) and isinstance(out.choices[0].message.content, str)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=served.name, messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.body["param"] == "messages" and "first message must come from the user" in e.value.body["message"]


def test_chat_template_is_sandboxed():
    for source in ["{{ ''.__class__.__mro__ }}", "{% set _ = messages.append(1) %}", "{{ messages.pop() }}"]:
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_api_key(served):
    ok = dict(model=served.name, prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as e:
        served.client("keyed", key="wrong").completions.create(**ok)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(served.url("keyed") + "/v1/completions", json=ok)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(served.url("keyed") + "/v1/models").status_code == 401
    assert served.client("keyed", key=KEY).completions.create(**ok).usage.completion_tokens == 2
    assert [m.id for m in served.client("keyed", key=KEY).models.list().data] == [served.name]
    assert httpx.get(served.url("keyed") + "/health").status_code == 200  # probes need no key


def test_overloaded_is_429_while_streams_are_held_open(served):
    client = served.client("tight")
    kw = dict(model=served.name, prompt=PROMPT, max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **kw)
    try:
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None  # the request is running
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(**{**kw, "max_tokens": 2})
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model=served.name, messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True
            )
    finally:
        stream.close()
    served.assert_idle()
    assert client.completions.create(**{**kw, "max_tokens": 2}).usage.completion_tokens == 2


def test_deadline_is_408_and_frees_blocks(served):
    kw = dict(model=served.name, prompt=PROMPT, max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIStatusError) as e:
        served.client("deadline").completions.create(**kw)
    assert e.value.status_code == 408 and e.value.body["code"] == "timeout"
    # streaming: the deadline passes after the response started (an error event) or before (408)
    with httpx.stream("POST", served.url("deadline") + "/v1/completions", json={**kw, "stream": True}) as r:
        body = r.read().decode()
    if r.status_code == 200:
        events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    else:
        assert r.status_code == 408 and json.loads(body)["error"]["code"] == "timeout"
    served.assert_idle()


# ------------------------------------------------------------------ client disconnect


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_mid_stream_aborts_the_request(served, path):
    body: dict[str, Any] = {"model": served.name, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    body.update({"prompt": PROMPT} if "chat" not in path else {"messages": [{"role": "user", "content": PROMPT}]})
    with httpx.stream("POST", served.url() + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        rid = r.headers["x-request-id"].split("-", 1)[1]
        got = list(itertools.islice((ln for ln in r.iter_lines() if ln.startswith("data: ")), 3))
        assert len(got) == 3 and all("error" not in json.loads(g.removeprefix("data: ")) for g in got)
    # the connection is closed with ~1900 tokens still to go
    deadline = time.monotonic() + 10
    while rid not in served.main.outcomes:
        assert time.monotonic() < deadline, "the request was not closed after the client disconnected"
        time.sleep(0.01)  # poll interval
    assert served.main.outcomes[rid] == "closed"  # closed early, never reached its final delta
    served.assert_idle()


def test_client_disconnect_while_waiting_for_a_non_streaming_answer_aborts(served):
    body = {"model": served.name, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    before = set(served.main.outcomes)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url() + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 10
    while not set(served.main.outcomes) - before:
        assert time.monotonic() < deadline, "the request was not closed after the client disconnected"
        time.sleep(0.01)  # poll interval
    (rid,) = set(served.main.outcomes) - before
    assert served.main.outcomes[rid] == "closed"
    served.assert_idle()
