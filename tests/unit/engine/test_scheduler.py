"""Scheduler without a model: a fake model fabricates sampled tokens and checks the KV pages.

``FakeModel`` stands in for ModelRunner. It keeps, per cache slot, an id of the content
a real model would have written there (the token prefix ending at that position), checks
before every step that the pages a request reads hold exactly its own prefix (so a prefix
hit, a preemption or an eviction that hands out the wrong page fails the test), never
writes into a page another request also holds, and samples ``next_token(all tokens)``,
a pure function, so the expected output of every request is known in advance.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import CacheConfig, SchedulerConfig, SchedulerMode
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus, SamplingParams
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler

EOS = 2


def next_token(tokens: list[int]) -> int:
    return 3 + hash(tuple(tokens)) % 500  # never EOS


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


def make_sched(num_blocks: int = 32, bs: int = 4, caching: bool = True, **cfg) -> Scheduler:
    cache = CacheConfig(block_size=bs, num_blocks=num_blocks, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(**cfg), cache, KVCacheManager(BlockPool(num_blocks, caching), bs))


def new_req(rid: str, prompt: int | list[int], max_tokens: int = 4, **params) -> Request:
    tokens = [100 + i for i in range(prompt)] if isinstance(prompt, int) else list(prompt)
    params.setdefault("ignore_eos", True)
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params), eos_token_ids=(EOS,))


class FakeModel:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.slots: dict[int, tuple[int, ...]] = {}  # slot -> token prefix whose K/V it holds

    def run(self, out: SchedulerOutput, forced: dict[str, int] | None = None) -> dict[str, list[int]]:
        bs = self.sched.kv.block_size
        pool = self.sched.kv.pool
        sampled = {}
        for s in out.scheduled:
            req = self.sched.requests[s.request_id]
            toks = req.all_token_ids
            assert s.start_pos == req.num_computed_tokens
            assert s.token_ids == toks[s.start_pos : s.start_pos + s.num_tokens]
            assert len(s.block_ids) * bs >= s.start_pos + s.num_tokens
            assert s.block_ids == self.sched.kv.block_ids(s.request_id)
            for p in range(s.start_pos):  # context read from the cache
                slot = s.block_ids[p // bs] * bs + p % bs
                assert self.slots.get(slot) == tuple(toks[: p + 1]), f"{s.request_id}: stale KV at position {p}"
            for p in range(s.start_pos, s.start_pos + s.num_tokens):
                block = s.block_ids[p // bs]
                assert pool.ref_counts[block] == 1, f"{s.request_id} writes into shared block {block}"
                self.slots[block * bs + p % bs] = tuple(toks[: p + 1])
            if s.sample:
                assert s.start_pos + s.num_tokens == len(toks)
                sampled[s.request_id] = [(forced or {}).get(s.request_id, next_token(toks))]
        return sampled


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert len(sched.running) <= cfg.max_num_seqs
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    pool = sched.kv.pool
    holders = [0] * pool.num_blocks
    for blocks in sched.kv.blocks.values():
        for b in blocks:
            holders[b] += 1
    assert holders == pool.ref_counts
    assert set(pool._free) == {b for b in range(pool.num_blocks) if holders[b] == 0}


def step(sched: Scheduler, model: FakeModel, forced: dict[str, int] | None = None) -> SchedulerOutput:
    out = sched.schedule()
    check_invariants(sched, out)
    sched.update(out, model.run(out, forced))
    return out


def run_all(sched: Scheduler, model: FakeModel | None = None, max_steps: int = 2000) -> list[SchedulerOutput]:
    model = model or FakeModel(sched)
    steps = []
    while sched.has_work:
        steps.append(step(sched, model))
        assert len(steps) < max_steps, "scheduler livelock"
    return steps


def assert_pool_full(sched: Scheduler) -> None:
    assert sched.kv.pool.num_free == sched.kv.pool.num_blocks
    assert not sched.kv.blocks and not sched.requests
    assert not sched.running and not sched.waiting and not sched.prefilled and not sched.reserved


# ----------------------------------------------------------------------------- batching


def test_continuous_batching_order():
    sched = make_sched(max_num_batched_tokens=64)
    model = FakeModel(sched)
    for rid, n in (("a", 5), ("b", 3), ("c", 7)):
        sched.add_request(new_req(rid, n, max_tokens=6))
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens, s.sample) for s in out.scheduled] == [
        ("a", 5, True),
        ("b", 3, True),
        ("c", 7, True),
    ]
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 1)]
    # a new arrival joins the running decodes in the same step, after them
    sched.add_request(new_req("d", 4, max_tokens=2))
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 1), ("d", 4)]
    reqs = {r: sched.requests[r] for r in "abcd"}
    run_all(sched, model)
    for r in reqs.values():
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params.max_tokens)
        assert r.finish_reason == FinishReason.LENGTH and r.is_finished
    assert_pool_full(sched)


def test_token_budget_and_max_num_seqs():
    sched = make_sched(num_blocks=64, max_num_batched_tokens=10, max_num_seqs=2)
    model = FakeModel(sched)
    for i, n in enumerate((6, 6, 6, 3)):
        sched.add_request(new_req(f"r{i}", n, max_tokens=3))
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens, s.sample) for s in out.scheduled] == [("r0", 6, True), ("r1", 4, False)]
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 2)]
    assert len(sched.running) == 2 and len(sched.waiting) == 2  # max_num_seqs holds r2 back
    steps = run_all(sched, model)
    assert max(o.num_tokens for o in steps) <= 10
    assert max(len(o.scheduled) for o in steps) <= 2
    assert_pool_full(sched)


def test_chunked_prefill_splits_long_prompt():
    sched = make_sched(num_blocks=16, max_num_batched_tokens=8)
    model = FakeModel(sched)
    r = new_req("a", 20, max_tokens=2)
    sched.add_request(r)
    chunks = [step(sched, model).scheduled[0] for _ in range(3)]
    assert [(c.start_pos, c.num_tokens, c.sample) for c in chunks] == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert len(r.output_token_ids) == 1
    run_all(sched, model)
    assert r.output_token_ids == reference(r.prompt_token_ids, 2)


def test_without_chunked_prefill_prompt_waits_for_a_whole_step():
    sched = make_sched(num_blocks=16, max_num_batched_tokens=8, enable_chunked_prefill=False)
    model = FakeModel(sched)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sched.add_request(new_req("big", 9))
    sched.add_request(new_req("a", 5, max_tokens=3))
    sched.add_request(new_req("b", [200, 201, 202, 203, 204], max_tokens=3))  # no prefix shared with a
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 5)]  # b does not fit in 3
    out = step(sched, model)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 5)]
    run_all(sched, model)
    assert_pool_full(sched)


# ----------------------------------------------------------------------------- preemption


def test_preemption_frees_blocks_and_requeues_at_front():
    sched = make_sched(num_blocks=4, bs=4, caching=False, max_num_batched_tokens=64)
    model = FakeModel(sched)
    a, b = new_req("a", 4, max_tokens=8), new_req("b", 4, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    late = new_req("late", 2, max_tokens=1)
    preempted_at = None
    for i in range(20):
        if i == 3:
            sched.add_request(late)  # arrives while the pool is full
        out = sched.schedule()
        check_invariants(sched, out)
        if out.preempted:
            preempted_at = out
            break
        sched.update(out, model.run(out))
    assert preempted_at is not None
    assert preempted_at.preempted == ["b"]  # the newest running request is the victim
    assert list(sched.waiting) == [b, late]  # back at the front, ahead of the later arrival
    assert b.status == RequestStatus.WAITING
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and b.output_token_ids
    assert sched.kv.block_ids("b") == [] and sched.num_preemptions == 1
    assert [s.request_id for s in preempted_at.scheduled] == ["a"]  # no admissions in a preempting step
    sched.update(preempted_at, model.run(preempted_at))
    run_all(sched, model)
    for r in (a, b):
        assert r.output_token_ids == reference(r.prompt_token_ids, 8)
    assert_pool_full(sched)


def test_request_larger_than_pool_finishes_with_length():
    sched = make_sched(num_blocks=4, bs=4, max_num_batched_tokens=64)
    r = new_req("a", 10, max_tokens=100)  # the pool holds 16 positions
    sched.add_request(r)
    run_all(sched)
    assert r.finish_reason == FinishReason.LENGTH
    assert r.num_tokens == 17  # positions 0..15 computed, the 17th token has no page
    assert r.output_token_ids == reference(r.prompt_token_ids, 7)
    assert_pool_full(sched)


def test_two_requests_outgrowing_pool_both_finish():
    sched = make_sched(num_blocks=4, bs=4, caching=False, max_num_batched_tokens=64)
    reqs = [new_req(x, 4, max_tokens=20) for x in "ab"]
    for r in reqs:
        sched.add_request(r)
    run_all(sched)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.finish_reason == FinishReason.LENGTH and r.num_tokens == 17
        assert r.output_token_ids == reference(r.prompt_token_ids, 13)
    assert_pool_full(sched)


def test_preempted_request_longer_than_budget_without_chunking_is_recomputed():
    """Regression: with chunked prefill off, a preempted request whose context has grown past
    max_num_batched_tokens used to block the waiting queue forever."""
    sched = make_sched(num_blocks=4, bs=4, caching=False, max_num_batched_tokens=8, enable_chunked_prefill=False)
    reqs = [new_req(x, 4, max_tokens=20) for x in "ab"]
    for r in reqs:
        sched.add_request(r)
    run_all(sched, max_steps=200)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.is_finished and r.output_token_ids == reference(r.prompt_token_ids, len(r.output_token_ids))
    assert_pool_full(sched)


def test_prefix_cache_hit_counts_and_reuse():
    sched = make_sched(num_blocks=32, bs=4, max_num_batched_tokens=64)
    model = FakeModel(sched)
    a = new_req("a", 10, max_tokens=2)
    sched.add_request(a)
    run_all(sched, model)
    assert a.num_cached_tokens == 0
    b = new_req("b", [*a.prompt_token_ids, 7, 7], max_tokens=2)
    sched.add_request(b)
    out = step(sched, model)
    assert b.num_cached_tokens == 8  # two full blocks of a's prompt
    assert out.scheduled[0].start_pos == 8 and out.scheduled[0].num_tokens == 4
    run_all(sched, model)
    assert b.output_token_ids == reference(b.prompt_token_ids, 2)
    assert_pool_full(sched)


# ----------------------------------------------------------------------------- stop conditions


def test_max_tokens_stop_token_and_eos():
    sched = make_sched()
    model = FakeModel(sched)
    r_len = new_req("len", 3, max_tokens=2)
    r_stop = new_req("stop", 3, max_tokens=10, stop_token_ids=(77,))
    r_eos = new_req("eos", 3, max_tokens=10, ignore_eos=False)
    r_ign = new_req("ign", 3, max_tokens=3, ignore_eos=True)
    for r in (r_len, r_stop, r_eos, r_ign):
        sched.add_request(r)
    step(sched, model)
    step(sched, model, forced={"stop": 77, "eos": EOS, "ign": EOS})
    assert r_len.finish_reason == FinishReason.LENGTH and len(r_len.output_token_ids) == 2
    assert r_stop.finish_reason == FinishReason.STOP and r_stop.output_token_ids[-1] == 77
    assert r_eos.finish_reason == FinishReason.STOP and r_eos.output_token_ids[-1] == EOS
    assert not r_ign.is_finished and r_ign.output_token_ids[-1] == EOS
    run_all(sched, model)
    assert r_ign.finish_reason == FinishReason.LENGTH and len(r_ign.output_token_ids) == 3
    assert_pool_full(sched)


def test_max_model_len_caps_the_context():
    sched = make_sched()
    r = new_req("a", 5, max_tokens=100)
    r.max_model_len = 9
    sched.add_request(r)
    run_all(sched)
    assert r.finish_reason == FinishReason.LENGTH and r.num_tokens == 9


def test_invalid_requests_are_rejected():
    sched = make_sched(num_blocks=2, bs=4)
    with pytest.raises(ValueError, match="at least one token"):
        sched.add_request(new_req("empty", []))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(new_req("huge", 8))  # 8 + 1 positions need 3 blocks
    sched.add_request(new_req("ok", 3))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(new_req("ok", 3))


# ----------------------------------------------------------------------------- disaggregated modes


def test_prefill_only_holds_blocks_until_release():
    sched = make_sched(num_blocks=16, max_num_batched_tokens=8, mode=SchedulerMode.PREFILL_ONLY)
    model = FakeModel(sched)
    r = new_req("a", 12, max_tokens=5)
    quick = new_req("one", 3, max_tokens=1)
    sched.add_request(r)
    sched.add_request(quick)
    run_all(sched, model)
    assert r.status == RequestStatus.PREFILLED and sched.prefilled == {"a": r}
    assert r.output_token_ids == reference(r.prompt_token_ids, 1)
    assert r.num_computed_tokens == 12 and len(sched.kv.block_ids("a")) == 3
    assert not sched.has_work
    # a request already done after its first token needs no transfer: it just finishes
    assert quick.finish_reason == FinishReason.LENGTH and "one" not in sched.prefilled
    released = sched.release("a")
    assert released is r and r.is_finished
    assert_pool_full(sched)


def test_decode_only_reserve_admit():
    sched = make_sched(num_blocks=6, bs=4, mode=SchedulerMode.DECODE_ONLY)
    model = FakeModel(sched)
    r = new_req("a", 10, max_tokens=4)
    blocks = sched.reserve(r)
    assert blocks is not None and len(blocks) == 3
    # the KV "arrives": fill the reserved pages as the prefill worker's model would have
    for p in range(10):
        model.slots[blocks[p // 4] * 4 + p % 4] = tuple(r.prompt_token_ids[: p + 1])
    other = new_req("b", 13, max_tokens=2)
    before = (sched.kv.pool.num_free, dict(sched.kv.blocks))
    assert sched.reserve(other) is None  # needs 4 blocks, 3 free
    assert (sched.kv.pool.num_free, dict(sched.kv.blocks)) == before
    assert "b" not in sched.requests
    with pytest.raises(ValueError, match="duplicate"):
        sched.reserve(r)
    first = next_token(r.prompt_token_ids)
    sched.admit("a", first)
    assert r.status == RequestStatus.RUNNING and r.num_computed_tokens == 10
    run_all(sched, model)
    assert r.output_token_ids == reference(r.prompt_token_ids, 4)
    assert_pool_full(sched)


def test_decode_only_admit_finishing_immediately():
    sched = make_sched(num_blocks=4, mode=SchedulerMode.DECODE_ONLY)
    r = new_req("a", 5, max_tokens=1)
    assert len(sched.reserve(r)) == 2  # the 5-token prompt's KV: 2 blocks of 4
    done = sched.admit("a", 42)
    assert done.finish_reason == FinishReason.LENGTH and done.output_token_ids == [42]
    assert_pool_full(sched)


# ----------------------------------------------------------------------------- abort


def test_abort_everywhere_returns_pool_to_full():
    sched = make_sched(num_blocks=16, max_num_batched_tokens=8)
    model = FakeModel(sched)
    running = new_req("running", 4, max_tokens=10)
    chunking = new_req("chunking", 12, max_tokens=10)  # mid-prefill after one step
    waiting = new_req("waiting", 4, max_tokens=10)
    for r in (running, chunking, waiting):
        sched.add_request(r)
    step(sched, model)
    assert chunking.status == RequestStatus.RUNNING and 0 < chunking.num_computed_tokens < 12
    assert waiting.status == RequestStatus.WAITING
    # abort while a step is in flight: update must skip the aborted request
    out = sched.schedule()
    sampled = model.run(out)
    assert sched.abort("running") is running
    sched.update(out, sampled)
    assert running.finish_reason == FinishReason.ABORT and running.output_token_ids == [
        next_token(running.prompt_token_ids)
    ]
    assert sched.abort("chunking") is chunking and sched.abort("waiting") is waiting
    assert sched.abort("unknown") is None
    assert waiting not in sched.waiting
    assert_pool_full(sched)

    pre = make_sched(num_blocks=8, mode=SchedulerMode.PREFILL_ONLY)
    p = new_req("p", 5)
    pre.add_request(p)
    run_all(pre)
    assert pre.abort("p") is p and p.finish_reason == FinishReason.ABORT
    assert_pool_full(pre)

    dec = make_sched(num_blocks=8, mode=SchedulerMode.DECODE_ONLY)
    d = new_req("d", 5)
    dec.reserve(d)
    assert dec.abort("d") is d
    with pytest.raises(KeyError):
        dec.admit("d", 1)
    assert_pool_full(dec)


# ----------------------------------------------------------------------------- property test


@st.composite
def workloads(draw):
    bs = draw(st.sampled_from([1, 2, 4, 8]))
    chunked = draw(st.booleans())
    n = draw(st.integers(1, 6))
    base = draw(st.lists(st.integers(3, 60), min_size=40, max_size=40))
    prompts = []
    for _ in range(n):
        shared = draw(st.integers(0, 24))  # common prefix with the other prompts
        tail = draw(st.lists(st.integers(3, 60), min_size=1, max_size=16))
        prompts.append(base[:shared] + tail)
    max_tokens = [draw(st.integers(1, 12)) for _ in range(n)]
    longest = max(len(p) for p in prompts)
    min_blocks = -(-(longest + 1) // bs)
    num_blocks = draw(st.integers(min_blocks, min_blocks + 3 * n * (-(-12 // bs)) + 4))
    budget = draw(st.integers(1 if chunked else longest, 48))
    return {
        "bs": bs,
        "chunked": chunked,
        "caching": draw(st.booleans()),
        "prompts": prompts,
        "max_tokens": max_tokens,
        "arrivals": [draw(st.integers(0, 6)) for _ in range(n)],
        "num_blocks": num_blocks,
        "budget": budget,
        "max_seqs": draw(st.integers(1, 4)),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_match_reference(w):
    sched = make_sched(
        num_blocks=w["num_blocks"],
        bs=w["bs"],
        caching=w["caching"],
        max_num_batched_tokens=w["budget"],
        max_num_seqs=w["max_seqs"],
        enable_chunked_prefill=w["chunked"],
    )
    model = FakeModel(sched)
    reqs = [new_req(f"r{i}", p, max_tokens=m) for i, (p, m) in enumerate(zip(w["prompts"], w["max_tokens"]))]
    pending = sorted(range(len(reqs)), key=lambda i: w["arrivals"][i])
    steps = 0
    while pending or sched.has_work:
        while pending and w["arrivals"][pending[0]] <= steps:
            sched.add_request(reqs[pending.pop(0)])
        step(sched, model)
        steps += 1
        assert steps < 3000, "scheduler livelock"
    capacity = w["num_blocks"] * w["bs"]
    for r in reqs:
        assert r.is_finished and r.finish_reason == FinishReason.LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, len(r.output_token_ids))
        if len(r.output_token_ids) < r.params.max_tokens:  # cut short only when the pool is too small
            assert r.num_tokens > capacity
    assert_pool_full(sched)


def test_random_workload_smoke_seeded():
    """A fixed larger run (many requests, tiny pool) independent of hypothesis' shrinking."""
    rng = random.Random(0)
    sched = make_sched(num_blocks=12, bs=4, max_num_batched_tokens=16, max_num_seqs=5)
    base = [rng.randrange(3, 60) for _ in range(20)]
    reqs = [
        new_req(f"r{i}", base[: rng.randrange(0, 20)] + [rng.randrange(3, 60) for _ in range(rng.randrange(1, 12))], 8)
        for i in range(12)
    ]
    for r in reqs:
        sched.add_request(r)
    run_all(sched)
    assert sched.num_preemptions > 0 and sched.kv.pool.prefix_hits > 0
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, 8)
    assert_pool_full(sched)
