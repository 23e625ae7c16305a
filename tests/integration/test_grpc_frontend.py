"""gRPC frontend + Python SDK over real localhost sockets, in front of an in-process LocalCluster.

One event loop thread hosts the cluster's router, the ServingBackend and the GrpcFrontend(s);
the tests talk to them through cluster.client (sync from the test thread, async on a loop of
their own) or through raw stubs where the SDK would refuse the input first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import (
    AlreadyExists,
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    TLSConfig,
    Unauthenticated,
    Unavailable,
)
from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.auth import TLSFiles
from cluster.frontends.grpc_server import SERVICE, GrpcFrontend
from cluster.frontends.service import Delta, ServingBackend, Usage
from engine import LLM, SamplingParams
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.loop_thread import LoopThread
from tests.pki import write_pki

pytestmark = pytest.mark.integration

MAX_LEN = 512  # max_position_embeddings of the test model: bounds every generation
ENGINE = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16}  # 2 max-length requests fit
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = dict(temperature=0.0, ignore_eos=True)  # no max_tokens: the rest of the context, ~1 s here
PROMPTS: list = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate((3, 9, 20, 37))] + [
    "Hello world, this is a test of the prompt path with enough tokens to split",
    "hi",
]


@dataclass
class Served:
    lt: LoopThread
    cluster: LocalCluster
    backend: ServingBackend
    frontend: GrpcFrontend
    target: str
    model: str


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    model = tiny_checkpoint("llama", max_position_embeddings=MAX_LEN)
    config = ServeConfig(
        model=model,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=8),
        transfer=TransferConfig(kind="loopback"),
    )
    lt = LoopThread("grpc-test-loop")

    async def up():
        cluster = await LocalCluster(config).start()
        backend = ServingBackend.from_model_dir(cluster.router, model)
        frontend = GrpcFrontend(backend, port=0)
        return cluster, backend, frontend, await frontend.start()

    cluster, backend, frontend, port = lt.run(up())
    yield Served(lt, cluster, backend, frontend, f"127.0.0.1:{port}", model)
    lt.run(frontend.stop(grace=0))
    cluster.shutdown()
    lt.close()


@pytest.fixture(scope="module")
def reference(served):
    """Greedy engine.LLM outputs for PROMPTS (same checkpoint, same engine options)."""
    return LLM(served.model, **ENGINE).generate(PROMPTS, SamplingParams(**GREEDY))


@contextmanager
def extra_frontend(srv: Served, backend=None, **kw):
    fe = GrpcFrontend(backend or srv.backend, **kw)
    port = srv.lt.run(fe.start())
    try:
        yield fe, port
    finally:
        srv.lt.run(fe.stop(grace=0))


class Recording:
    """A ServingBackend stand-in: delegates everything, records generate() calls, and can
    replace the real stream by a scripted list of Deltas."""

    def __init__(self, real: ServingBackend, script: list[Delta] | None = None):
        self._real = real
        self.script = script
        self.timeouts: list[float | None] = []
        self.outcomes: list[str] = []  # per call: "finished" | "closed early"

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def generate(self, ids, params, request_id=None, timeout_s=None, **kw):
        self.timeouts.append(timeout_s)
        finished = False
        try:
            if self.script is not None:
                for d in self.script:
                    yield d
                return
            async for d in self._real.generate(ids, params, request_id, timeout_s, **kw):
                finished = d.finish_reason is not None
                yield d
        finally:
            self.outcomes.append("finished" if finished else "closed early")


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_idle(srv: Served, *frontends: GrpcFrontend) -> None:
    """No request left anywhere: frontends, backend, and every worker's KV pool back to full,
    all ENGINE["num_blocks"] blocks free (blocks are released asynchronously, so poll with a
    deadline; a pool reporting 0 of 0 blocks is not full)."""
    for fe in (srv.frontend, *frontends):
        wait_until(lambda fe=fe: not fe.active, what="frontend requests to end")
    wait_until(lambda: srv.backend.inflight == 0, what="backend in-flight count to reach 0")
    full = (ENGINE["num_blocks"], ENGINE["num_blocks"])
    for wid, w in srv.cluster.workers.items():
        wait_until(lambda w=w: ((s := w.stats().engine).free_kv_blocks, s.total_kv_blocks) == full, what=f"{wid} pool")


# ---------------------------------------------------------------- round trips


def test_sync_generate_equals_engine_llm(served, reference):
    with Client(served.target) as c:
        outs = [c.generate(p, **GREEDY) for p in PROMPTS]
    for out, ref, p in zip(outs, reference, PROMPTS, strict=True):
        assert out.token_ids == ref.token_ids, f"prompt {p!r} diverged"
        assert out.finish_reason == "length"
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert out.usage.completion_tokens == len(ref.token_ids)
        # text deltas hold back an incomplete trailing UTF-8 character; the rest matches
        assert ref.text.startswith(out.text) and len(out.text) >= len(ref.text) - 4
    assert_idle(served)


def test_stream_chunks_are_contiguous_and_end_once(served, reference):
    with Client(served.target) as c:
        chunks = list(c.stream(PROMPTS[3], logprobs=2, **GREEDY))
    assert [ch.index for ch in chunks] == [sum(len(x.token_ids) for x in chunks[:i]) for i in range(len(chunks))]
    assert all(ch.finish_reason is None and ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]
    assert len({ch.request_id for ch in chunks}) == 1 and chunks[0].request_id
    tokens = [t for ch in chunks for t in ch.token_ids]
    assert tokens == reference[3].token_ids
    lps = [lp for ch in chunks for lp in ch.logprobs]
    assert [lp.token_id for lp in lps] == tokens
    for lp in lps:  # greedy: the chosen token is the most likely one
        assert len(lp.top) == 2 and max(lp.top.values()) == pytest.approx(lp.logprob, abs=1e-5)


def test_async_client_round_trip(served, reference):
    async def main():
        async with AsyncClient(served.target) as c:
            outs = await asyncio.gather(*(c.generate(p, **GREEDY) for p in PROMPTS))
            streamed = [ch async for ch in c.stream(PROMPTS[2], **GREEDY)]
            return outs, streamed, await c.model_info()

    outs, streamed, info = asyncio.run(main())
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert [t for ch in streamed for t in ch.token_ids] == reference[2].token_ids
    assert (info.vocab_size, info.max_model_len) == (512, MAX_LEN)  # the tiny checkpoint's
    assert_idle(served)


def test_model_and_server_info(served):
    with Client(served.target) as c:
        mi, si = c.model_info(), c.server_info()
    assert mi.model == served.backend.model_name and mi.num_layers == served.backend.model_config.num_layers
    assert list(mi.eos_token_ids) == list(served.backend.model_config.eos_token_ids)
    assert {(w.worker_id, w.role, w.healthy) for w in si.workers} == {
        ("prefill-0", "prefill", True),
        ("decode-0", "decode", True),
    }
    assert {(p.role, p.num_workers, p.num_healthy) for p in si.pools} == {("prefill", 1, 1), ("decode", 1, 1)}
    assert si.max_queue == served.backend.max_queue and all(w.total_kv_blocks == 256 for w in si.workers)


# ---------------------------------------------------------------- status codes


@pytest.mark.parametrize(
    "prompt,kw,field",
    [
        ([5, 6, 7], dict(max_tokens=-1), "max_tokens"),
        ([5, 6, 7], dict(max_tokens=2**40), "max_tokens"),
        ([5, 6, 7], dict(temperature=-0.5), "temperature"),
        ([5, 6, 7], dict(temperature=float("nan")), "temperature"),
        ([5, 6, 7], dict(top_p=0.0), "top_p"),
        ([5, 6, 7], dict(top_p=1.5), "top_p"),
        ([5, 6, 7], dict(logprobs=21), "logprobs"),
        ([5, 6, 7], dict(stop=[""]), "stop"),
        ([5, 6, 7], dict(stop_token_ids=[10**6]), "stop_token_ids"),
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ([5, 10**6], {}, "prompt"),
        ([5, -1], {}, "prompt"),
        ([5] * MAX_LEN, {}, "prompt"),  # reaches the context window
        ([5, 6, 7], dict(max_tokens=2**70), "max_tokens"),  # refused by the SDK before sending
    ],
)
def test_invalid_argument_names_the_field(served, prompt, kw, field):
    with Client(served.target) as c, pytest.raises(InvalidArgument) as err:
        c.generate(prompt, **kw)
    assert err.value.field == field, err.value


def test_sdk_refuses_bad_arguments_before_sending(served):
    with Client("127.0.0.1:1", max_retries=0) as c:  # nothing listens there: no call is made
        with pytest.raises(TypeError, match="unknown sampling parameter"):
            c.stream([5, 6, 7], temprature=0.5)
        with pytest.raises(InvalidArgument) as err:
            c.stream([5, 2**40])
        assert err.value.field == "prompt"
        with pytest.raises(TypeError):
            c.generate(3.5)


def test_unauthenticated_without_the_key(served):
    with extra_frontend(served, api_key="s3cret") as (_, port):
        target = f"127.0.0.1:{port}"
        for key in (None, "wrong"):
            with Client(target, api_key=key) as c, pytest.raises(Unauthenticated):
                c.generate([5, 6, 7], max_tokens=2)
            with Client(target, api_key=key) as c, pytest.raises(Unauthenticated):
                c.server_info()
        with Client(target, api_key="s3cret") as c:
            assert len(c.generate([5, 6, 7], max_tokens=2, ignore_eos=True).token_ids) == 2
        with grpc.insecure_channel(target) as ch:  # x-api-key works too; health needs no key
            stub = pb_grpc.SplitServeStub(ch)
            info = stub.GetModelInfo(pb.ModelInfoRequest(), metadata=(("x-api-key", "s3cret"),))
            assert (info.vocab_size, info.max_model_len) == (512, MAX_LEN)  # the tiny checkpoint's
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_resource_exhausted_at_the_inflight_limit(served):
    small = ServingBackend.from_model_dir(served.cluster.router, served.model, max_queue=1)
    with extra_frontend(served, small) as (fe, port), Client(f"127.0.0.1:{port}") as c:
        held = c.stream(PROMPTS[2], **LONG)
        assert next(held).finish_reason is None  # admitted and streaming
        with pytest.raises(ResourceExhausted, match="capacity"):
            c.generate([5, 6, 7], max_tokens=2)
        held.close()
        wait_until(lambda: small.inflight == 0, what="held stream to be released")
        assert len(c.generate([5, 6, 7], max_tokens=2, ignore_eos=True).token_ids) == 2
    assert_idle(served, fe)


def test_unavailable_when_no_decode_worker_is_healthy(served):
    served.lt.call(served.cluster.router.mark_unhealthy, "decode-0")
    try:
        with Client(served.target, max_retries=2, backoff_s=0.01) as c, pytest.raises(Unavailable):
            c.generate([5, 6, 7], max_tokens=2)
        with grpc.insecure_channel(served.target) as ch:
            for service in ("", SERVICE):
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        served.lt.call(served.cluster.router.mark_healthy, "decode-0")
    with Client(served.target) as c:
        assert len(c.generate([5, 6, 7], max_tokens=2, ignore_eos=True).token_ids) == 2
    assert_idle(served)


def test_deadline_exceeded_aborts_the_request(served):
    rec = Recording(served.backend)
    with extra_frontend(served, rec) as (fe, port), Client(f"127.0.0.1:{port}") as c:
        with pytest.raises(DeadlineExceeded):
            c.generate(PROMPTS[2], timeout=0.15, **LONG)

        async def via_async_client():
            async with AsyncClient(f"127.0.0.1:{port}", timeout=0.15) as ac:
                await ac.generate(PROMPTS[2], **LONG)

        with pytest.raises(DeadlineExceeded):  # same through the async client
            asyncio.run(via_async_client())
        wait_until(lambda: len(rec.outcomes) == 2, what="both requests to end")
        assert rec.outcomes == ["closed early", "closed early"]
        assert all(t is not None and 0 < t < 1.0 for t in rec.timeouts)  # the client's deadline reached the backend
        c.generate([5, 6, 7], max_tokens=1, timeout=30.0)
        assert 25.0 < rec.timeouts[-1] < 31.0  # grpc deadlines carry some clock slack
        c.generate([5, 6, 7], max_tokens=1)
        assert rec.timeouts[-1] is None  # no deadline: the backend's own request timeout applies
    assert_idle(served, fe)


def test_cancel_mid_stream_frees_blocks_everywhere(served):
    rec = Recording(served.backend)
    with extra_frontend(served, rec) as (fe, port), Client(f"127.0.0.1:{port}") as c:
        stream = c.stream(PROMPTS[3], **LONG)
        got = [next(stream) for _ in range(3)]
        assert all(ch.finish_reason is None for ch in got)
        load = served.cluster.workers["decode-0"].stats().engine
        assert load.free_kv_blocks < load.total_kv_blocks  # the request holds blocks now
        stream.close()  # cancels the call
        wait_until(lambda: rec.outcomes, what="the backend stream to be closed")
        assert rec.outcomes == ["closed early"]
    assert_idle(served, fe)


def test_abort_rpc_ends_the_stream_with_finish_reason_abort(served):
    with Client(served.target) as c:
        stream = c.stream(PROMPTS[3], request_id="abort-me", **LONG)
        first = next(stream)
        assert first.request_id == "abort-me"
        with pytest.raises(AlreadyExists):
            c.generate([5, 6, 7], request_id="abort-me", max_tokens=2)
        assert c.abort("abort-me") is True
        rest = list(stream)
        assert rest[-1].finish_reason == "abort"
        assert rest[-1].usage.completion_tokens == sum(len(ch.token_ids) for ch in [first, *rest]) < MAX_LEN
        assert c.abort("abort-me") is False
    assert_idle(served)


def test_request_id_can_be_reused_once_finished(served, reference):
    """Client ids are names, not cluster ids: reusing one (split path, so both workers see the
    request) neither collides with the finished request's worker state nor breaks anything."""
    with Client(served.target) as c:
        outs = [c.generate(PROMPTS[3], request_id="mine", **GREEDY) for _ in range(2)]
    assert [o.request_id for o in outs] == ["mine", "mine"]
    assert [o.token_ids for o in outs] == [reference[3].token_ids] * 2
    # the second one is prefilled from the prefill worker's prefix cache: 9 full blocks of the
    # 37-token prompt (the block holding its last token is computed); usage reports them
    assert outs[1].usage.cached_tokens == 36
    assert_idle(served)


def test_failure_mid_stream_ends_with_unavailable_and_no_retry(served):
    script = [
        Delta(0, [11], "a"),
        Delta(1, [], "", finish_reason="abort", error="worker decode-0 unavailable: gone", usage=Usage(3, 1)),
    ]
    rec = Recording(served.backend, script)
    with extra_frontend(served, rec) as (_, port), Client(f"127.0.0.1:{port}", max_retries=3, backoff_s=0.01) as c:
        seen = []
        with pytest.raises(Unavailable, match="after 1 tokens: worker decode-0 unavailable"):
            for ch in c.stream([5, 6, 7], max_tokens=4):
                seen.append(ch)
        assert [ch.token_ids for ch in seen] == [[11]]
        assert len(rec.timeouts) == 1  # a token had arrived: not retried


# ---------------------------------------------------------------- client retry policy


def test_client_retries_unavailable_only_before_the_first_token(served):
    """A scripted SplitServe server: each Generate call takes the next behaviour."""
    behaviours: list[str] = []
    calls: list[str] = []

    async def generate(data, context):
        b = behaviours.pop(0)
        calls.append(b)
        if b == "token-then-unavailable":
            await context.write(pb.GenerateResponse(token_ids=[1]))
        if b != "ok":
            code = grpc.StatusCode.INVALID_ARGUMENT if b == "invalid" else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, b)
        await context.write(pb.GenerateResponse(token_ids=[9], finish_reason="stop"))

    async def up():
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(
            generate, response_serializer=pb.GenerateResponse.SerializeToString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Generate": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = served.lt.run(up())
    try:
        with Client(f"127.0.0.1:{port}", max_retries=2, backoff_s=0.001) as c:
            behaviours[:] = ["unavailable", "unavailable", "ok"]
            assert c.generate([1]).token_ids == [9] and len(calls) == 3
            calls.clear()
            behaviours[:] = ["unavailable"] * 3 + ["ok"]
            with pytest.raises(Unavailable):
                c.generate([1])
            assert len(calls) == 3  # 1 + max_retries
            calls.clear()
            behaviours[:] = ["token-then-unavailable", "ok"]
            with pytest.raises(Unavailable):
                c.generate([1])
            assert calls == ["token-then-unavailable"]
            calls.clear()
            behaviours[:] = ["invalid", "ok"]
            with pytest.raises(InvalidArgument):
                c.generate([1])
            assert calls == ["invalid"]
    finally:
        served.lt.run(server.stop(0))


# ---------------------------------------------------------------- health, reflection, TLS


def test_health_and_reflection_answer(served):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served.target) as ch:
        for service in ("", SERVICE):
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        assert {SERVICE, "grpc.health.v1.Health"} <= set(db.get_services())
        svc = DescriptorPool(db).FindServiceByName(SERVICE)
        gen = svc.methods_by_name["Generate"]
        assert gen.output_type.full_name == "splitserve.v1.GenerateResponse" and gen.server_streaming
        assert "temperature" in gen.input_type.fields_by_name["sampling"].message_type.fields_by_name


def test_tls_and_mutual_tls_round_trip(served, tmp_path):
    pki = write_pki(tmp_path)
    with extra_frontend(served, tls=TLSFiles(pki.server, pki.server_key)) as (_, port):
        with Client(f"localhost:{port}", tls=TLSConfig(ca=pki.ca)) as c:
            assert len(c.generate([5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3
        with Client(f"localhost:{port}", max_retries=0) as c, pytest.raises(Unavailable):
            c.generate([5, 6, 7], max_tokens=3)  # plaintext client, TLS server
    mtls = TLSFiles(pki.server, pki.server_key, ca=pki.ca)
    with extra_frontend(served, tls=mtls) as (_, port):
        full = TLSConfig(ca=pki.ca, cert=pki.client, key=pki.client_key)
        with Client(f"localhost:{port}", tls=full) as c:
            assert len(c.generate([5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3
        with Client(f"localhost:{port}", tls=TLSConfig(ca=pki.ca), max_retries=0, timeout=10) as c:
            with pytest.raises(Unavailable):  # no client certificate: the handshake fails
                c.generate([5, 6, 7], max_tokens=3)
    assert_idle(served)
