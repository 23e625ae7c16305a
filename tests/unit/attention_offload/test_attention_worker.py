"""AttentionWorker (the attention pool's worker, plain class): sizing from the pool's engine
options, serving a model worker over a gloo group it joins, and idle handling: a model worker
that pings between steps keeps its shards alive past the group's timeout; one that does not
ping fails them loudly after it."""

from __future__ import annotations

import time

import pytest

from attention_offload.build import shard_layout
from attention_offload.dist_transport import DistAttentionTransport
from attention_offload.offloaded import OffloadedEngine
from attention_offload.worker import MODEL_RANK, AttentionWorker, attention_blocks, build_attention_worker
from engine.kv_cache.paged_cache import PagedKVCache
from engine.llm import build_engine_config
from engine.parallel import TorchDistCommunicator
from engine.request import Request
from engine.runtime.groups import free_port, join_group
from tests.unit.attention_offload.test_attention_offload import (
    BLOCK,
    GREEDY,
    PROMPTS,
    agreement,
    assert_pools_full,
    reference,
    run,
)
from tests.unit.engine.gloo_ranks import HOST, run_ranks, spec

BLOCKS = 24  # per attention worker


@pytest.fixture(scope="module")
def dense(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama")


def _workers(model: str, n: int) -> list[AttentionWorker]:
    return [
        build_attention_worker(model, {"num_blocks": BLOCKS, "block_size": BLOCK}, f"attention-{i}", backend="sdpa")
        for i in range(n)
    ]


def _join(workers: list[AttentionWorker], timeout_s: float) -> TorchDistCommunicator:
    """Forms [model worker = rank 0, workers 1..N] as form_group does; returns rank 0's comm."""
    port, world = free_port(HOST), len(workers) + 1

    def rank(r: int):
        if r == MODEL_RANK:
            return join_group(spec(r, world, port, "attn", timeout_s))
        workers[r - 1].join_group(spec(r, world, port, "attn", timeout_s))
        return None

    group = run_ranks(rank, world)[MODEL_RANK]
    return TorchDistCommunicator(group, timeout_s=timeout_s, name="attn")


def _idle(engine: OffloadedEngine, seconds: float) -> None:
    """The model worker's engine loop while idle: a keepalive tick every 10 ms (the idle period
    under test, not a synchronisation)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        engine.keepalive()
        time.sleep(0.01)


def test_blocks_come_from_the_pools_engine_options(dense):
    assert attention_blocks(build_engine_config(dense, num_blocks=7)) == 7
    cfg = build_engine_config(dense, max_kv_memory_gb=0.001, block_size=BLOCK)
    assert attention_blocks(cfg) == PagedKVCache.blocks_for_memory(shard_layout(cfg), 0.001) > 1
    with pytest.raises(TypeError, match="unknown engine options"):
        build_attention_worker(dense, {"num_block": 3})


def test_keepalive_carries_idle_shards_past_the_timeout_and_output_equals_llm(dense):
    timeout_s = 1.0
    workers = _workers(dense, 2)
    assert [w.stats().state for w in workers] == ["waiting", "waiting"]
    comm = _join(workers, timeout_s)
    cfg = build_engine_config(dense, enable_prefix_caching=False, num_blocks=2 * BLOCKS, block_size=BLOCK)
    transport = DistAttentionTransport(comm, [1, 2], shard_layout(cfg))
    engine = OffloadedEngine(cfg, transport, [BLOCKS, BLOCKS], rotation=2, keepalive_s=timeout_s / 4)
    try:
        _idle(engine, 3 * timeout_s)  # three timeouts without a step
        assert engine.pings >= 8
        assert [w.stats().state for w in workers] == ["serving", "serving"]
        out = run(engine)
        pings = engine.pings
        _idle(engine, 2 * timeout_s)  # idle again after serving
        assert engine.pings > pings
        out2 = run(engine, PROMPTS[:2])
        assert_pools_full(engine)  # a STATS round trip: every step before it is served
        for i, w in enumerate(workers):
            s = w.stats()
            assert (s.state, s.shard, s.total_blocks, s.live_contexts) == ("serving", i, BLOCKS, 0) and s.batches > 0
    finally:
        transport.close()
    ref = reference(dense)
    assert agreement(out, ref) == 1.0 and agreement(out2, ref[:2]) == 1.0
    for w in workers:
        assert w.wait_stopped(10.0)
        s = w.stats()
        assert s.state == "closed" and s.served > 0 and s.error is None


def test_a_step_right_after_the_keepalive_interval_is_not_disturbed_by_pings(dense):
    """A ping is only sent between steps: a keepalive call while requests run (no time passed
    without a message) sends nothing, so the shards' in-step order is never broken."""
    workers = _workers(dense, 1)
    comm = _join(workers, 5.0)
    cfg = build_engine_config(dense, enable_prefix_caching=False, num_blocks=BLOCKS, block_size=BLOCK)
    transport = DistAttentionTransport(comm, [1], shard_layout(cfg))
    engine = OffloadedEngine(cfg, transport, [BLOCKS], rotation=1, keepalive_s=1e-6)
    try:
        reqs = [Request(f"r{i}", list(p), GREEDY) for i, p in enumerate(PROMPTS[:3])]
        for r in reqs:
            engine.add_request(r)
        while engine.has_work():
            engine.step()
            engine.keepalive()  # every step sent messages: no ping
        assert engine.pings == 0
        assert engine.keepalive() and engine.pings == 1  # nothing sent since: the next call pings
    finally:
        transport.close()
    assert agreement([r.output_token_ids for r in reqs], reference(dense, prompts=PROMPTS[:3])) == 1.0
    assert workers[0].wait_stopped(10.0) and workers[0].stats().state == "closed"


def test_an_idle_shard_without_keepalive_fails_loudly_after_the_timeout(dense):
    (worker,) = _workers(dense, 1)
    _join([worker], 0.5)  # the model worker never sends anything
    assert worker.wait_stopped(10.0)
    s = worker.stats()
    assert s.state == "failed" and "CommunicationError" in (s.error or "")
    with pytest.raises(RuntimeError, match="already joined a group"):
        worker.join_group(spec(1, 2, free_port(HOST), "again", 0.5))


def test_rank_zero_is_the_model_workers(dense):
    (worker,) = _workers(dense, 1)
    with pytest.raises(ValueError, match="rank 0 is the model worker's"):
        worker.join_group(spec(0, 2, free_port(HOST), "attn", 0.5))
    assert worker.stats().state == "waiting"
