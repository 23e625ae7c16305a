"""A context larger than the whole KV pool ends with "length" instead of stalling the queue."""

from __future__ import annotations

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.request import FinishReason, Request, SamplingParams
from engine.scheduler.scheduler import Scheduler


def _step(s: Scheduler, token: int = 7) -> None:
    out = s.schedule()
    s.update(out, {sr.request_id: [token] for sr in out.scheduled if sr.sample})


def test_growing_request_beyond_pool_finishes_with_length_while_others_wait():
    kv = KVCacheManager(BlockPool(6), block_size=4)  # 24 token slots
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), CacheConfig(block_size=4, num_blocks=6), kv)
    big = Request("big", list(range(10)), SamplingParams(max_tokens=100, ignore_eos=True))
    small = Request("small", list(range(8)), SamplingParams(max_tokens=4, ignore_eos=True))
    s.add_request(big)
    s.add_request(small)
    for _ in range(200):
        if not s.has_work:
            break
        _step(s)
    assert not s.has_work, "scheduler stalled"
    assert big.finish_reason == FinishReason.LENGTH and big.num_tokens == 24 + 1  # every slot, + the sampled token
    assert small.finish_reason == FinishReason.LENGTH and len(small.output_token_ids) == 4
    assert kv.pool.num_free == 6


def test_request_preempted_by_a_reservation_resumes_then_stops_at_pool_capacity():
    kv = KVCacheManager(BlockPool(6), block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), CacheConfig(block_size=4, num_blocks=6), kv)
    big = Request("big", list(range(10)), SamplingParams(max_tokens=100, ignore_eos=True))
    s.add_request(big)
    for _ in range(6):  # grow to 16 tokens: 4 blocks
        _step(s)
    held = s.reserve(Request("incoming", list(range(8)), SamplingParams(max_tokens=4)))  # 2 blocks
    assert held is not None
    for _ in range(20):
        _step(s)
        if big.status.value == "waiting":
            break
    assert big.status.value == "waiting"  # preempted: the reservation pins the rest of the pool
    s.abort("incoming")
    for _ in range(40):
        if not s.has_work:
            break
        _step(s)
    assert big.finish_reason == FinishReason.LENGTH and big.num_tokens == 25
    assert not s.has_work and kv.pool.num_free == 6


def test_request_finished_by_schedule_is_reported_by_update():
    kv = KVCacheManager(BlockPool(3), block_size=4)
    s = Scheduler(SchedulerConfig(), CacheConfig(block_size=4, num_blocks=3), kv)
    req = Request("r", list(range(6)), SamplingParams(max_tokens=100, ignore_eos=True))
    s.add_request(req)
    reported = []
    while s.has_work:
        out = s.schedule()
        reported += s.update(out, {sr.request_id: [1] for sr in out.scheduled if sr.sample})
    assert req.finish_reason == FinishReason.LENGTH
    assert reported[-1] is req  # the caller learns it finished (streams are closed from this)
