"""Speculative decoding in disaggregated serving (LocalCluster: prefill worker -> KV transfer ->
decode worker whose engine speculates), with the n-gram proposer and a draft model, fixed k
and SmartSpec: greedy output equal to engine.LLM without speculation, proposals made and
accepted, every KV pool (the decode worker's draft pool included) full again.

The decode worker's draft model builds its own prompt KV when the request is admitted (the
prefill worker sends the target's KV only): the draft is small, so that costs less than
shipping a second cache; see DESIGN.md."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.grpc_server import server_info_message
from cluster.frontends.service import ServerInfo
from cluster.metrics.registry import Metrics
from engine import LLM, SamplingParams
from engine.types import RequestSpec

ENGINE = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 32}
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
# repetitive prompts: the n-gram lookup finds continuations in them
PROMPTS = [[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 8 + [40, 41], [300 + (i % 7) for i in range(26)]]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def plain(model):
    return [o.token_ids for o in LLM(model, **ENGINE).generate(PROMPTS, GREEDY)]


def _spec(model: str, method: str, policy: str) -> dict:
    spec = {"method": method, "num_speculative_tokens": 3, "policy": policy}
    return {**spec, "model": model} if method == "draft_model" else spec  # the target as its own draft


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("policy", ["fixed", "smartspec"])
def test_speculating_decode_worker_matches_plain_decoding(model, plain, method, policy):
    cfg = ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=ENGINE),
            PoolConfig("decode", "decode", 1, engine={**ENGINE, "speculative_config": _spec(model, method, policy)}),
        ),
        router=RouterConfig(short_prompt_threshold=4),  # every prompt is prefilled on the prefill worker
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg).start()
        try:

            async def one(i: int, prompt: list[int]) -> list[int]:
                tokens: list[int] = []
                async for chunk in cluster.router.generate(RequestSpec(f"r{i}", prompt, GREEDY)):
                    assert chunk.error is None, chunk.error
                    tokens += chunk.token_ids
                return tokens

            outputs = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
            decode, prefill = cluster.workers["decode-0"], cluster.workers["prefill-0"]
            for _ in range(200):  # the prefill worker frees its blocks once each transfer settles
                if prefill.stats().engine.free_kv_blocks == ENGINE["num_blocks"]:
                    break
                prefill.loop.run(lambda: None)
            metrics = Metrics("spec")
            metrics.attach(cluster.router, transport="loopback")
            await cluster.router.refresh_loads()  # the reports the metrics and GetServerInfo read
            info = server_info_message(ServerInfo(cluster=cluster.info(), inflight=0, max_queue=8))
            return outputs, decode.engine.spec_stats(), decode.stats(), prefill.stats(), metrics, info
        finally:
            await cluster.stop()

    outputs, spec, decode_stats, prefill_stats, metrics, info = asyncio.run(run())
    assert outputs == plain  # every token the target's argmax: equal to decoding without speculation
    assert spec.method == method and spec.policy == policy
    assert spec.proposed_tokens > 0 and spec.accepted_tokens > 0  # it did speculate, and drafts were taken
    assert spec.accepted_tokens <= spec.proposed_tokens
    assert decode_stats.engine.free_kv_blocks == decode_stats.engine.total_kv_blocks == ENGINE["num_blocks"]
    assert prefill_stats.engine.free_kv_blocks == ENGINE["num_blocks"]
    # GetServerInfo shows the draft model's own KV pool beside the target's (all free again)
    drafts = {w.worker_id: (w.draft_free_kv_blocks, w.draft_total_kv_blocks) for w in info.workers}
    if method == "draft_model":
        assert spec.draft_kv is not None and spec.draft_kv.free_blocks == spec.draft_kv.total_blocks > 0
        assert drafts == {"prefill-0": (0, 0), "decode-0": (spec.draft_kv.total_blocks, spec.draft_kv.total_blocks)}
    else:
        assert drafts == {"prefill-0": (0, 0), "decode-0": (0, 0)}  # n-gram: no draft pool
    # the worker reports its counters and the chosen-k histogram; the router exports them
    report = decode_stats.speculation
    assert (report.proposed_tokens, report.accepted_tokens) == (spec.proposed_tokens, spec.accepted_tokens)
    assert report.chosen_k.count == sum(spec.k_counts) and report.chosen_k.counts[-1] == sum(spec.k_counts)
    assert prefill_stats.speculation is None
    d = {"model": "spec", "pool": "decode", "worker": "decode-0"}
    assert metrics.sample_value("splitserve_spec_draft_tokens_total", d) == spec.proposed_tokens
    assert metrics.sample_value("splitserve_spec_accepted_tokens_total", d) == spec.accepted_tokens
    assert metrics.sample_value("splitserve_spec_chosen_k_bucket", {**d, "le": "0.0"}) == spec.k_counts[0]
    assert metrics.sample_value("splitserve_spec_chosen_k_count", d) == sum(spec.k_counts)
    assert (
        metrics.sample_value("splitserve_spec_draft_tokens_total", {**d, "pool": "prefill", "worker": "prefill-0"})
        is None
    )


def test_a_request_can_opt_out_of_speculation_through_the_frontends(model, plain):
    """``allow_speculation: false`` (gRPC SamplingParams field, OpenAI body extension) keeps a
    speculating decode worker from drafting for that request; a non-boolean is refused
    naming the field."""
    from cluster.frontends.openai_api import CompletionRequest
    from cluster.frontends.service import InvalidRequest, ServingBackend
    from protos import splitserve_pb2 as pb

    assert pb.SamplingParams(allow_speculation=False).HasField("allow_speculation")
    body = CompletionRequest.model_validate({"prompt": [1, 2, 3], "allow_speculation": False})
    assert body.sampling_fields()["allow_speculation"] is False
    cfg = ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=ENGINE),
            PoolConfig("decode", "decode", 1, engine={**ENGINE, "speculative_config": _spec(model, "ngram", "fixed")}),
        ),
        router=RouterConfig(short_prompt_threshold=4),
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg).start()
        try:
            backend = ServingBackend.from_model_dir(cluster.router, model)
            with pytest.raises(InvalidRequest, match="allow_speculation"):
                backend.sampling_params(len(PROMPTS[0]), allow_speculation="no")
            spec = cluster.workers["decode-0"].engine.spec_stats
            counts = []
            outputs = []
            for allow in (False, True):
                params = backend.sampling_params(
                    len(PROMPTS[0]), max_tokens=40, temperature=0.0, ignore_eos=True, allow_speculation=allow
                )
                tokens = []
                async for d in backend.generate(PROMPTS[0], params):
                    tokens += d.token_ids
                outputs.append(tokens)
                counts.append(spec().proposed_tokens)
            return counts, outputs
        finally:
            await cluster.stop()

    counts, outputs = asyncio.run(run())
    assert counts[0] == 0 and counts[1] > 0  # no drafts for the opted-out request; drafts for the other
    assert outputs == [plain[0], plain[0]]
