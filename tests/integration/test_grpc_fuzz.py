"""Property test: malformed and extreme GenerateRequests never break the gRPC frontend.

Every answer is either an OK completion whose stream is well formed, or a refusal with a
client-error status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED for an oversized message,
ALREADY_EXISTS); never INTERNAL, UNKNOWN or UNAVAILABLE (the cluster is healthy, so
UNAVAILABLE would mean a request took a worker down). Afterwards the server still serves a
normal request and every KV pool is back to full. Requests go through raw stubs (and raw
bytes), not the SDK, which would refuse some inputs before sending them.
"""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.grpc_server import SERVICE, GrpcFrontend
from cluster.frontends.service import ServingBackend
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.loop_thread import LoopThread

pytestmark = pytest.mark.integration

MAX_LEN = 64  # small context window: every accepted request generates at most 63 tokens
VOCAB = 512
ENGINE = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 16}
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}

INT32 = st.one_of(st.integers(-3, VOCAB + 3), st.integers(-(2**31), 2**31 - 1))
INT64 = st.one_of(
    st.integers(-3, MAX_LEN + 3),
    st.sampled_from([2**20, 2**20 + 1, 2**31 - 1, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
FLOATS = st.one_of(  # NaN, infinities, negative zero, denormals and huge values
    st.floats(0.0, 2.0),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1e-300, 100.0, 100.000001, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # lone surrogates are not UTF-8
VALID_PROMPT = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80),
)
# (valid values, extreme values) per field
FIELDS = {
    "prompt": (
        VALID_PROMPT,
        st.one_of(
            st.none(),
            TEXT,
            st.lists(INT32, max_size=80),
            st.integers(60, 300_000).map(lambda n: "token " * n),  # up to ~1.8 MB of text
            st.integers(MAX_LEN - 2, 20_000).map(lambda n: [7] * n),
        ),
    ),
    "max_tokens": (st.integers(1, 40), INT64),
    "temperature": (st.floats(0.0, 2.0), FLOATS),
    "top_k": (st.integers(-1, VOCAB + 8), INT32),
    "top_p": (st.floats(0.0, 1.0, exclude_min=True), FLOATS),
    "seed": (INT64, INT64),
    "ignore_eos": (st.booleans(), st.booleans()),
    "logprobs": (st.integers(0, 20), INT32),
    "stop": (st.lists(st.text(min_size=1, max_size=3), max_size=3), st.lists(st.text(max_size=4), max_size=18)),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=3), st.lists(INT32, max_size=4)),
}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """A valid request (optional fields set at random) with up to two fields made extreme."""
    values = {name: draw(valid) for name, (valid, _) in FIELDS.items() if name == "prompt" or draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2)):
        values[name] = draw(FIELDS[name][1])
    req = pb.GenerateRequest()
    prompt = values.pop("prompt")
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, list):
        req.token_ids.ids.extend(prompt)
        req.token_ids.SetInParent()
    for name, value in values.items():
        if isinstance(value, list):
            getattr(req.sampling, name).extend(value)
        else:
            setattr(req.sampling, name, value)
    if draw(st.booleans()):
        req.request_id = draw(st.one_of(st.sampled_from(["a", "b"]), st.text(max_size=16)))  # reuse is likely
    return req


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    model = tiny_checkpoint("llama", max_position_embeddings=MAX_LEN)
    config = ServeConfig(
        model=model,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=8),
        transfer=TransferConfig(kind="loopback"),
    )
    lt = LoopThread("grpc-fuzz-loop")

    async def up():
        cluster = await LocalCluster(config).start()
        backend = ServingBackend.from_model_dir(cluster.router, model)
        frontend = GrpcFrontend(backend)
        return cluster, backend, frontend, await frontend.start()

    cluster, backend, frontend, port = lt.run(up())
    assert backend.model_config.vocab_size == VOCAB
    yield cluster, backend, frontend, f"127.0.0.1:{port}"
    lt.run(frontend.stop(grace=0))
    cluster.shutdown()
    lt.close()


def _check_answer(call_responses, req: pb.GenerateRequest | None) -> None:
    """OK: a well-formed stream. Otherwise: an allowed status."""
    try:
        msgs = list(call_responses())
    except grpc.RpcError as e:
        event(f"status {e.code().name}")
        assert e.code() in ALLOWED, f"{e.code()}: {e.details()}"
        return
    event("status OK")
    assert msgs and msgs[-1].finish_reason in ("stop", "length"), msgs[-1:]
    assert all(not m.finish_reason and not m.HasField("usage") for m in msgs[:-1])
    tokens = [t for m in msgs for t in m.token_ids]
    assert [m.index for m in msgs] == [sum(len(x.token_ids) for x in msgs[:i]) for i in range(len(msgs))]
    assert all(0 <= t < VOCAB for t in tokens)
    usage = msgs[-1].usage
    assert usage.completion_tokens == len(tokens) >= 1
    assert usage.prompt_tokens + len(tokens) <= MAX_LEN
    if req is not None and req.sampling.HasField("max_tokens"):
        assert len(tokens) <= req.sampling.max_tokens


def test_malformed_and_extreme_requests(server):
    cluster, backend, frontend, target = server
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.SplitServeStub(channel)
    raw = channel.unary_stream(f"/{SERVICE}/Generate", response_deserializer=pb.GenerateResponse.FromString)

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(st.one_of(generate_requests(), generate_requests(), generate_requests(), st.binary(max_size=64)))
    def prop(req):
        if isinstance(req, bytes):
            _check_answer(lambda: raw(req, timeout=10), None)
        else:
            _check_answer(lambda: stub.Generate(req, timeout=10), req)

    try:
        prop()
        # still serving, and nothing leaked
        sampling = pb.SamplingParams(max_tokens=5, ignore_eos=True)
        ok = list(stub.Generate(pb.GenerateRequest(text="hello", sampling=sampling), timeout=30))
        assert sum(len(m.token_ids) for m in ok) == ok[-1].usage.completion_tokens == 5
        assert ok[-1].finish_reason == "length"
        deadline = time.monotonic() + 10
        while frontend.active or backend.inflight:
            assert time.monotonic() < deadline, "requests left in flight"
            time.sleep(0.01)  # poll interval
        for wid, w in cluster.workers.items():  # every block free again (0 of 0 is not full)
            while (load := w.stats().engine).free_kv_blocks != ENGINE["num_blocks"]:
                assert time.monotonic() < deadline, f"{wid} leaked KV blocks: {load}"
                time.sleep(0.01)  # poll interval
            assert load.total_kv_blocks == ENGINE["num_blocks"], load
    finally:
        channel.close()
