"""Per-shard admission: a request lives whole on one attention shard, so the engine's pool is
partitioned like the shards and "its shard is full" is the scheduler's ordinary "no free
block" (preempt the newest request of that shard, or wait), never an error inside a step.

The regression: 2 shards x 6 blocks of 8 tokens and 5 requests with long outputs used to
fail inside the step (the engine admitted against the shards' total)."""

from __future__ import annotations

import pytest

from attention_offload.build import build_loopback
from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.partitioned import PartitionedBlockPool, PartitionedKVCacheManager
from engine.llm import LLM, build_engine_config
from engine.request import FinishReason, Request, SamplingParams
from engine.scheduler.scheduler import Scheduler
from tests.unit.engine.test_scheduler import FakeModel, new_req, reference


def make_manager(sizes: list[int], bs: int = 4) -> PartitionedKVCacheManager:
    return PartitionedKVCacheManager(PartitionedBlockPool(sizes), bs)


def test_each_request_draws_from_one_partition_and_a_full_partition_refuses():
    kv = make_manager([2, 3])
    a, b, c = (new_req(x, 4) for x in "abc")
    placed = []
    for r in (a, b, c):
        assert kv.allocate(r, 4)
        placed.append((r.request_id, kv.partition_of(r.request_id)))
    # most free first (ties -> lowest index): a -> 1 (3 free), b -> 0 (2 vs 2), c -> 1 (1 vs 2)
    assert placed == [("a", 1), ("b", 0), ("c", 1)]
    assert kv.block_ids("b") == [0] and {kv.block_ids("a")[0], kv.block_ids("c")[0]} <= {2, 3, 4}
    assert kv.shares_pool("a", "c") and not kv.shares_pool("a", "b") and not kv.shares_pool("a", "nobody")
    assert kv.max_blocks_per_request == 2
    # a grows to 12 tokens: 2 more blocks; 2 are free in total but only 1 in a's partition
    assert kv.pool.num_free == 2
    assert not kv.allocate(a, 12)  # a computed nothing yet: 12 positions
    assert kv.block_ids("a") == [kv.block_ids("a")[0]] and kv.pool.num_free == 2  # nothing changed
    kv.free("c")
    assert kv.partition_of("c") is None
    assert kv.allocate(a, 12) and len(kv.block_ids("a")) == 3
    assert all(kv.pool.partition_of(blk) == 1 for blk in kv.block_ids("a"))
    assert (kv.partition_of("a"), kv.partition_of("b")) == (1, 0)  # growing never re-places
    with pytest.raises(TypeError, match="allocate_in"):
        kv.pool.allocate(1)
    for rid in ("a", "b"):
        kv.free(rid)
    assert kv.pool.num_free == kv.pool.num_blocks == 5 and not kv.partition


def test_a_reservation_names_its_partition_or_takes_the_most_free():
    """A transfer whose KV goes straight to one store reserves in that store's partition
    (decode_worker/worker.py places it before blocks are free); without one: the most free."""
    kv = make_manager([2, 3])
    assert kv.reserve("a", 4, partition=0) == [0] and kv.partition_of("a") == 0  # not the most free (1)
    assert kv.reserve("b", 8, partition=0) is None and "b" not in kv.blocks  # 2 blocks, 1 free in 0
    assert kv.reserve("b", 8) == [2, 3] and kv.partition_of("b") == 1  # the most free
    with pytest.raises(ValueError, match=r"partition 2 is not in \[0, 2\)"):
        kv.reserve("c", 4, partition=2)
    with pytest.raises(ValueError, match="not partitioned"):
        KVCacheManager(BlockPool(4), 4).reserve("d", 4, partition=0)
    for rid in ("a", "b"):
        kv.free(rid)
    assert kv.pool.num_free == 5 and not kv.partition


def make_sched(sizes: list[int], bs: int = 4) -> Scheduler:
    kv = make_manager(sizes, bs)
    cache = CacheConfig(block_size=bs, num_blocks=sum(sizes), enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64), cache, kv)


def run_all(sched: Scheduler, max_steps: int = 500) -> list[list[str]]:
    """Steps until done -> each step's preempted ids."""
    model, preempted = FakeModel(sched), []
    while sched.has_work:
        out = sched.schedule()
        preempted.append(out.preempted)
        sched.update(out, model.run(out))
        assert len(preempted) < max_steps, "scheduler livelock"
    return preempted


def test_the_victim_is_the_newest_request_of_the_full_partition():
    sched = make_sched([2, 2])
    reqs = [new_req(x, 4, max_tokens=4) for x in "abcd"]  # 8 tokens at the end: 2 blocks each
    for r in reqs:
        sched.add_request(r)
    steps = run_all(sched)
    # placed a -> 0, b -> 1, c -> 0, d -> 1; at the second step a needs a block of partition 0:
    # c goes (not d, the newest overall, whose blocks a cannot use), then b's: d
    assert steps[1] == ["c", "d"]
    for r in reqs:
        assert r.finish_reason == FinishReason.LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, 4)
    assert sched.kv.pool.num_free == 4 and not sched.kv.blocks and not sched.requests


def test_a_request_alone_in_its_full_partition_finishes_with_length():
    sched = make_sched([2, 2])
    long, short = new_req("long", 4, max_tokens=20), new_req("short", 4, max_tokens=3)
    sched.add_request(long)
    sched.add_request(short)
    run_all(sched)
    assert long.finish_reason == FinishReason.LENGTH and long.num_tokens == 9  # 8 slots of its partition
    assert long.output_token_ids == reference(long.prompt_token_ids, 5)
    assert short.output_token_ids == reference(short.prompt_token_ids, 3)
    assert sched.num_preemptions == 0  # short, in the other partition, is never a victim
    with pytest.raises(ValueError, match="needs 3 KV blocks for 9 tokens but the cache has 2"):
        sched.add_request(new_req("big", 8))  # fits the total (4 blocks), not one partition


# ------------------------------------------------------------------ the regression, end to end

BLOCK = 8
PROMPTS = [[3 + i, 17, 33 + 2 * i, 40, 9 + i] * (1 + i) for i in range(5)]  # 5 .. 25 tokens
LONG = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)  # <= 45 tokens: 6 blocks


@pytest.fixture(scope="module")
def dense(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama")


def test_two_tight_shards_preempt_instead_of_failing_and_match_llm(dense):
    llm = LLM(dense, skip_tokenizer_init=True, enable_prefix_caching=False, num_blocks=12, block_size=BLOCK)
    ref = [o.token_ids for o in llm.generate(PROMPTS, LONG)]
    cfg = build_engine_config(dense, enable_prefix_caching=False, num_blocks=12, block_size=BLOCK)
    engine = build_loopback(cfg, [6, 6], rotation=2)
    reqs = [Request(f"r{i}", list(p), LONG) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        engine.add_request(r)
    shards_used: set[int] = set()
    while engine.has_work():
        engine.step()
        shards_used |= {engine.shard_of(r.request_id) for r in reqs} - {None}
        held = [
            sum(len(engine.core.block_ids(r.request_id)) for r in reqs if engine.shard_of(r.request_id) == s)
            for s in range(2)
        ]
        assert engine.used_blocks() == held and all(h <= 6 for h in held)  # each shard's pages, never more
    assert shards_used == {0, 1}
    assert engine.core.stats().preemptions > 0  # the shards were really full: not vacuous
    assert [r.output_token_ids for r in reqs] == ref
    assert all(r.finish_reason == FinishReason.LENGTH and len(r.output_token_ids) == 20 for r in reqs)
    for s in range(2):
        st = engine.transport.stats(s)
        assert (st.total_blocks, st.live_contexts) == (6, 0) and st.batches > 0, f"shard {s}: {st}"
    assert engine.used_blocks() == [0, 0] and engine.core.pool.num_free == 12
    engine.transport.close()
