"""Resume and Retry-After through the real frontends (gRPC SDK and OpenAI HTTP over localhost
sockets) in front of an in-process LocalCluster: a request followed live from a cursor, a
cancelled one continued, a finished one replayed (never generated again), unknown ids and
bad cursors refused; refusals carry Retry-After; a degraded state store is reported by
/health and GetServerInfo while serving goes on."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from cluster.client import Client, InvalidArgument, NotFound, ResourceExhausted
from cluster.config import PoolConfig, RouterConfig, ServeConfig, StateConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.grpc_server import GrpcFrontend
from cluster.frontends.http_server import HttpFrontend
from cluster.frontends.service import ServingBackend
from engine import LLM, SamplingParams
from engine.engine import StepResult
from tests.loop_thread import LoopThread
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16}
N = 40
GREEDY = dict(max_tokens=N, temperature=0.0, ignore_eos=True)
PROMPT = [(5 * j) % 400 + 3 for j in range(21)]


class Served:
    def __init__(self, model: str, state: StateConfig | None = None, max_queue: int = 64):
        config = ServeConfig(
            model=model,
            pools=(
                PoolConfig("prefill", "prefill", 1, engine=ENGINE),
                PoolConfig("decode", "decode", 1, engine=ENGINE),
            ),
            router=RouterConfig(short_prompt_threshold=8),
            transfer=TransferConfig(kind="loopback"),
            state=state or StateConfig(),
        )
        self.lt = LoopThread("resume-test-loop")

        async def up():
            cluster = await LocalCluster(config).start()
            backend = ServingBackend.from_model_dir(cluster.router, model, max_queue=max_queue)
            grpc_fe, http_fe = GrpcFrontend(backend, port=0), HttpFrontend(backend, port=0)
            return cluster, backend, grpc_fe, http_fe, await grpc_fe.start(), await http_fe.start()

        self.cluster, self.backend, self.grpc, self.http, gport, hport = self.lt.run(up())
        self.target = f"127.0.0.1:{gport}"
        self.base = f"http://127.0.0.1:{self.http.port}"

    def close(self) -> None:
        self.lt.run(self.http.stop())
        self.lt.run(self.grpc.stop(grace=0))
        self.lt.run(self.cluster.stop())
        self.lt.close()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama", max_position_embeddings=512)


@pytest.fixture(scope="module")
def served(model):
    s = Served(model)
    yield s
    s.close()


@pytest.fixture(scope="module")
def expected(model):
    return LLM(model, **ENGINE).generate([PROMPT], SamplingParams(**GREEDY))[0].token_ids


def _sse_tokens(text: str) -> tuple[list[int], list[dict]]:
    # SSE lines end at \n only (str.splitlines would also split inside the JSON at \x85, \u2028, ...)
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    return [t for e in events for c in e.get("choices", []) for t in c.get("token_ids", [])], events


def test_resume_follows_a_live_stream_from_its_cursor(served, expected):
    # The decode worker generates nothing past the 5th token until the resumed stream has its
    # first chunk, so the request is still being generated when Resume arrives however slow
    # or fast the machine: a live follow, never a replay.
    decode = served.cluster.workers["decode-0"]
    paused = threading.Event()
    real_step = _pause_at(decode, 5, paused)
    live_before = served.cluster.router.stats.resumed["live"]
    try:
        with Client(served.target) as a, Client(served.target) as b:
            stream = a.stream(PROMPT, request_id="live-1", **GREEDY)
            got = []
            for chunk in stream:
                got += chunk.token_ids
                if len(got) >= 5:
                    break  # keep the call open but stop reading; resume from another client
            resumed = b.resume("live-1", 3)
            first = next(resumed)
            assert served.cluster.router.stats.resumed["live"] == live_before + 1
            assert first.token_ids == expected[3:5]  # what was generated so far, from the cursor
            paused.clear()
            tail = first.token_ids + [t for ch in resumed for t in ch.token_ids]
            stream.close()
    finally:
        paused.clear()
        decode.engine.step = real_step
    assert tail == expected[3:]


def _pause_at(worker, tokens: int, paused: threading.Event):
    """Set ``paused`` (once) when a request on ``worker`` has ``tokens`` output tokens; while it is
    set the worker's engine steps do nothing (no token is generated, whatever the machine's
    speed), but its loop still runs calls between them (an abort goes through). Returns the
    real step, to put back."""
    real = worker.engine.step
    armed = [True]  # pauses once: clearing ``paused`` lets generation run to the end

    def step(*args, **kwargs):
        if paused.is_set():
            return StepResult()
        result = real(*args, **kwargs)
        if armed[0] and any(len(r.output_token_ids) >= tokens for r in result.outputs):
            armed[0] = False
            paused.set()
        return result

    worker.engine.step = step
    return real


def test_a_cancelled_request_is_continued_and_a_finished_one_replayed(served, expected):
    router = served.cluster.router
    decode = served.cluster.workers["decode-0"]
    paused = threading.Event()
    real_step = _pause_at(decode, 7, paused)  # nothing past token 7 until it is cancelled
    try:
        with Client(served.target) as c:
            stream = c.stream(PROMPT, request_id="cut-1", **GREEDY)
            got = []
            for chunk in stream:
                got += chunk.token_ids
                if len(got) >= 7:
                    break
            stream.close()  # the client lost its stream: the request is cancelled on the workers
            deadline = time.monotonic() + 30
            while "cut-1" in router.by_key:  # the router ends it (journaled as cancelled)
                assert time.monotonic() < deadline, "the cancellation never reached the router"
                time.sleep(0.01)  # poll interval
            paused.clear()
            _check_continued_then_replayed(served, c, got, expected)
    finally:
        paused.clear()
        decode.engine.step = real_step


def _check_continued_then_replayed(served, c, got: list[int], expected: list[int]) -> None:
    """Resume of the cancelled "cut-1" continues it from ``got``; once finished, a Resume
    replays it from the journal and generates nothing."""
    router = served.cluster.router
    continued_before = router.stats.resumed["continued"]
    chunks = list(c.resume("cut-1", len(got)))
    assert router.stats.resumed["continued"] == continued_before + 1
    assert chunks[0].index == len(got)
    assert got + [t for ch in chunks for t in ch.token_ids] == expected
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == N
    # finished now: replayed from the journal, whatever the cursor; nothing is generated
    placements = len(served.lt.run(served.cluster.store.journal_load("cut-1")).routes)
    counts = dict(router.stats.resumed)
    replay = list(c.resume("cut-1", 10))
    assert [t for ch in replay for t in ch.token_ids] == expected[10:]
    assert replay[-1].finish_reason == "length"
    assert router.stats.resumed == {**counts, "replayed": counts["replayed"] + 1}
    assert len(served.lt.run(served.cluster.store.journal_load("cut-1")).routes) == placements


def test_sdk_stream_with_resume_continues_across_a_frontend_restart(served, expected):
    """The gRPC frontend stops mid-stream (its calls are cancelled: the request is aborted on
    the workers) and a new one serves the same port: the SDK resumes at the tokens received
    and the caller sees one stream, no token repeated or missing."""
    from tests.redis_server import free_port

    port = free_port()
    first = GrpcFrontend(served.backend, port=port)
    served.lt.run(first.start())
    second = None
    before = sum(served.cluster.router.stats.resumed.values())
    decode = served.cluster.workers["decode-0"]
    paused = threading.Event()
    real_step = _pause_at(decode, 4, paused)  # the stream is cut mid-way, not after its end
    try:
        with Client(f"127.0.0.1:{port}", backoff_s=0.2, max_retries=10) as c:
            got = []
            for chunk in c.stream(PROMPT, request_id="sdk-1", resume=True, **GREEDY):
                got += chunk.token_ids
                if len(got) >= 4 and second is None:
                    served.lt.run(first.stop(grace=0))
                    second = GrpcFrontend(served.backend, port=port)
                    served.lt.run(second.start())
                    paused.clear()
        assert got == expected
        # exactly one Resume: "continued" when the frontend's cancellation aborted the request
        # on the workers first, "live" when the SDK came back before that
        assert sum(served.cluster.router.stats.resumed.values()) == before + 1
    finally:
        paused.clear()
        decode.engine.step = real_step
        served.lt.run(first.stop(grace=0))
        if second is not None:
            served.lt.run(second.stop(grace=0))


def test_unknown_ids_and_bad_cursors_are_refused(served, expected):
    with Client(served.target) as c:
        with pytest.raises(NotFound, match="no request 'never' in the journal"):
            list(c.resume("never", 0))
        list(c.stream(PROMPT, request_id="short-1", max_tokens=3, temperature=0.0, ignore_eos=True))
        with pytest.raises(InvalidArgument, match="cursor: 9 is past the 3 tokens") as e:
            list(c.resume("short-1", 9))
        assert e.value.field == "cursor"


def test_http_resume_of_a_cancelled_completion(served, expected):
    body = {
        "prompt": PROMPT,
        "max_tokens": N,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    router = served.cluster.router
    decode = served.cluster.workers["decode-0"]
    paused = threading.Event()
    real_step = _pause_at(decode, 6, paused)  # nothing past token 6 until it is cancelled
    continued = router.stats.resumed["continued"]
    try:
        with httpx.Client(base_url=served.base, timeout=60) as http:
            got, rid = [], None
            with http.stream("POST", "/v1/completions", json=body) as r:
                rid = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        got += json.loads(line[6:])["choices"][0].get("token_ids", [])
                    if len(got) >= 6:
                        break  # closing the response cancels the request
            deadline = time.monotonic() + 30
            while router.by_key:  # the router ends it (journaled as cancelled)
                assert time.monotonic() < deadline, "the cancellation never reached the router"
                time.sleep(0.01)  # poll interval
            paused.clear()
            r = http.get(f"/v1/resume/{rid}", params={"cursor": len(got)})
            assert r.status_code == 200 and r.headers["x-request-id"] == rid
            tail, events = _sse_tokens(r.text)
            assert got + tail == expected
            assert router.stats.resumed["continued"] == continued + 1  # a cancelled request, continued
            assert events[-2]["choices"][0]["finish_reason"] == "length" and r.text.endswith("data: [DONE]\n\n")
            assert events[-1]["usage"]["completion_tokens"] == N
            missing = http.get("/v1/resume/cmpl-req-nope")
            assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"
    finally:
        paused.clear()
        decode.engine.step = real_step


def test_a_follower_that_takes_a_request_over_is_admitted(served, expected):
    """Resume follows a live request, then its owner is cancelled: the follower takes it over
    and from then on counts as an admitted request (in flight, refused past max_queue), and
    the stream still ends with exactly the greedy tokens."""
    backend = served.backend
    router = served.cluster.router
    decode = served.cluster.workers["decode-0"]
    paused = threading.Event()
    real_step = _pause_at(decode, 6, paused)  # nothing past token 6 until the owner is cancelled

    async def scenario():
        owner = backend.generate(PROMPT, SamplingParams(**GREEDY), request_id="take-over-1")
        got = []
        async for delta in owner:
            got += delta.token_ids
            if len(got) >= 6:
                break
        resumed = await backend.resume("take-over-1", len(got))
        assert backend.inflight == 1  # the owner; a follower is not admitted twice
        await owner.aclose()  # the owner's client goes away: the request is cancelled
        deadline = time.monotonic() + 30
        while router.by_key:
            assert time.monotonic() < deadline, "the cancellation never reached the router"
            await asyncio.sleep(0.01)  # poll interval
        assert backend.inflight == 0
        paused.clear()
        tail, inflight = [], []
        async for delta in resumed.deltas:
            tail += delta.token_ids
            inflight.append(backend.inflight)
        return got, tail, inflight

    try:
        continued = router.stats.resumed["continued"]
        got, tail, inflight = served.lt.run(scenario())
        assert got + tail == expected
        assert router.stats.resumed["continued"] == continued + 1  # taken over, not followed to the end
        assert inflight and set(inflight) == {1}  # the take-over is counted while it runs
        assert backend.inflight == 0
    finally:
        paused.clear()
        decode.engine.step = real_step


def test_refusals_carry_retry_after(model):
    s = Served(model, max_queue=1)
    # the decode worker generates nothing past the 2nd token until the refusals are checked, so
    # the one request in flight cannot finish (and free the queue) first, however fast the machine
    decode = s.cluster.workers["decode-0"]
    paused = threading.Event()
    real_step = _pause_at(decode, 2, paused)
    try:
        with Client(s.target, max_retries=0) as c, httpx.Client(base_url=s.base, timeout=60) as http:
            stream = c.stream(PROMPT, **GREEDY)
            next(stream)  # one request in flight: the server is at max_queue
            with pytest.raises(ResourceExhausted) as e:
                list(c.stream(PROMPT, max_tokens=2))
            assert e.value.retry_after_s == 1.0
            r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            paused.clear()
            stream.close()
    finally:
        paused.clear()
        decode.engine.step = real_step
        s.close()


def test_degraded_state_store_keeps_serving_and_says_so(model, expected):
    redis = RedisServer()
    s = Served(model, StateConfig(redis_url=redis.url, op_timeout_s=0.3, reconnect_interval_s=0.2))
    try:
        with Client(s.target) as c, httpx.Client(base_url=s.base, timeout=60) as http:
            assert http.get("/health").json()["status"] == "ok"
            info = c.server_info()
            assert (info.state_store, info.state_store_status) == ("redis", "ok")
            redis.stop()
            out = c.generate(PROMPT, **GREEDY)  # serving goes on without durability
            assert out.token_ids == expected
            h = http.get("/health")
            assert h.status_code == 200 and h.json()["status"] == "degraded" and "unreachable" in h.json()["detail"]
            assert c.server_info().state_store_status == "degraded"
            metrics = s.cluster.store.health()
            assert metrics.outages == 1 and metrics.dropped_writes > 0
            redis.start()  # it comes back by itself; live journals are rewritten
            deadline = time.monotonic() + 10
            while http.get("/health").json()["status"] != "ok":
                assert time.monotonic() < deadline, "the state store never reconnected"
                time.sleep(0.1)  # poll interval while the store reconnects
            assert c.generate(PROMPT, request_id="after", **GREEDY).token_ids == expected
            rec = s.lt.run(s.cluster.store.journal_load("after"))
            assert rec.token_ids == tuple(expected) and rec.end.finish_reason == "length"
    finally:
        s.close()
        redis.close()


def test_cancel_then_resume_races_lose_and_repeat_nothing(model):
    """Many clients at once cancel a stream at a random token and Resume it at once (the
    cancel reaches the router while the Resume arrives: followed, taken over, or continued
    from the journal): every request ends with exactly its max_tokens, no token repeated or
    missing, no internal error. With the Redis store (journal writes take a round trip)."""
    import random

    from cluster.client import AsyncClient

    redis = RedisServer()
    s = Served(model, StateConfig(redis_url=redis.url))
    bad: list = []
    served: list[tuple[list[int], int, list[int]]] = []  # (prompt, max_tokens, received + resumed)

    async def client(k: int) -> None:
        rng = random.Random(k)
        async with AsyncClient(s.target) as c:
            for it in range(15):
                n = rng.randint(4, 40)
                prompt = [rng.randrange(3, 500) for _ in range(rng.randint(3, 40))]
                rid, got, stop = f"race-{k}-{it}", [], rng.randint(1, n - 1)
                async for ch in c.stream(prompt, request_id=rid, max_tokens=n, temperature=0.0, ignore_eos=True):
                    got += ch.token_ids
                    if len(got) >= stop or ch.finish_reason:
                        break
                rest, last = [], None
                async for ch in c.resume(rid, len(got)):
                    rest += ch.token_ids
                    last = ch
                if len(got) + len(rest) != n or last.finish_reason != "length":
                    bad.append((rid, n, len(got), len(rest), last))
                served.append((prompt, n, got + rest))

    async def all_clients() -> None:
        await asyncio.gather(*(client(k) for k in range(6)))

    try:
        asyncio.run(all_clients())
    finally:
        s.close()
        redis.close()
    assert bad == []
    # the tokens themselves: greedy, so each stream is a prefix of engine.LLM's 40-token output
    # (a token repeated and another missing would keep the count right but not the sequence)
    longest = LLM(model, **ENGINE).generate([p for p, _, _ in served], SamplingParams(**{**GREEDY, "max_tokens": 40}))
    wrong = [(p, n) for (p, n, toks), ref in zip(served, longest) if toks != ref.token_ids[:n]]
    assert len(served) == 6 * 15 and wrong == []
