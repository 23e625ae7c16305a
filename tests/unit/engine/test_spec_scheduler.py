"""Scheduling and rolling back draft tokens, without a model.

``SpecFakeModel`` extends the scheduler tests' fake model to speculative entries: it records,
per cache slot, the token prefix whose K/V a real model would have written there (draft
tokens included), checks before every step that each request reads exactly its own prefix
(a rejected draft's slot read as context, or a prefix-cache hit on a block that held a
rejected draft, fails), and verifies drafts against ``next_token``, a pure function: a draft
is accepted while it equals the true next token, then the true token follows. Proposals are
random mixtures of right and wrong tokens, so rejections fall at every offset and cross
block boundaries (block size 4, up to 6 drafts).
"""

from __future__ import annotations

import random

import pytest

from engine.request import Request
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler
from tests.unit.engine.test_scheduler import assert_pool_full, check_invariants, make_sched, new_req, next_token


class SpecFakeModel:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.slots: dict[int, tuple[int, ...]] = {}

    def run(self, out: SchedulerOutput) -> dict[str, list[int]]:
        bs = self.sched.kv.block_size
        pool = self.sched.kv.pool
        sampled = {}
        for s in out.scheduled:
            req = self.sched.requests[s.request_id]
            toks = req.all_token_ids
            k = s.num_draft_tokens
            assert s.start_pos == req.num_computed_tokens
            known = s.token_ids[: s.num_tokens - k]
            drafts = s.token_ids[s.num_tokens - k :]
            assert known == toks[s.start_pos : s.start_pos + len(known)]
            assert drafts == req.draft_token_ids[:k]
            assert len(s.block_ids) * bs >= s.start_pos + s.num_tokens
            for p in range(s.start_pos):
                slot = s.block_ids[p // bs] * bs + p % bs
                assert self.slots.get(slot) == tuple(toks[: p + 1]), f"{s.request_id}: stale KV at position {p}"
            seq = toks[: s.start_pos] + s.token_ids
            for p in range(s.start_pos, s.start_pos + s.num_tokens):
                block = s.block_ids[p // bs]
                assert pool.ref_counts[block] == 1, f"{s.request_id} writes into shared block {block}"
                self.slots[block * bs + p % bs] = tuple(seq[: p + 1])
            if not s.sample:
                continue
            emitted, ctx = [], list(toks)
            for d in drafts:
                if d != next_token(ctx):
                    break
                emitted.append(d)
                ctx.append(d)
            emitted.append(next_token(ctx))
            sampled[s.request_id] = emitted
        return sampled


def propose(sched: Scheduler, rng: random.Random, k_max: int) -> None:
    """Drafts for every decoding request: a right prefix of random length, then wrong tokens."""
    for req in sched.running:
        if req.num_computed_tokens != req.num_tokens - 1:
            continue
        k = rng.randint(0, k_max)
        right = rng.randint(0, k)
        ctx, drafts = list(req.all_token_ids), []
        for j in range(k):
            t = next_token(ctx)
            if j >= right:
                t = 3 + (t + 1 - 3) % 500  # any other token
            drafts.append(t)
            ctx.append(t)
        req.draft_token_ids = drafts


def run_spec(sched: Scheduler, seed: int, k_max: int = 6, max_steps: int = 3000) -> list[SchedulerOutput]:
    rng = random.Random(seed)
    model = SpecFakeModel(sched)
    steps = []
    while sched.has_work:
        propose(sched, rng, k_max)
        out = sched.schedule()
        check_invariants(sched, out)
        sched.update(out, model.run(out))
        for req in sched.running:
            req.draft_token_ids = []
        steps.append(out)
        assert len(steps) < max_steps, "scheduler livelock"
    return steps


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_drafts_verify_and_roll_back_without_leaks(seed, caching):
    rng = random.Random(100 + seed)
    sched = make_sched(num_blocks=40, bs=4, caching=caching, max_num_batched_tokens=24, max_num_seqs=5)
    shared = [7, 8, 9, 10, 11, 12, 13, 14, 15]  # a prefix several prompts share (prefix-cache hits)
    reqs = []
    for i in range(10):
        prompt = (shared if i % 2 else []) + [rng.randrange(3, 500) for _ in range(rng.randint(1, 14))]
        reqs.append(new_req(f"r{i}", prompt, max_tokens=rng.randint(1, 30)))
        sched.add_request(reqs[-1])
    steps = run_spec(sched, seed)
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params.max_tokens), r.request_id
    assert sum(s.num_draft_tokens for o in steps for s in o.scheduled) > 50  # drafts were verified
    assert_pool_full(sched)
    if caching:
        # every cached hash is that of a real prefix (prompt + output), never one with a draft
        from engine.kv_cache.manager import prefix_block_hashes

        real = set()
        for r in reqs:
            real |= set(prefix_block_hashes(r.all_token_ids + [0], 4))
        cached = sched.kv.pool.cached_hashes()
        assert cached and cached <= real  # some blocks were cached, none of them holding a draft


def test_drafts_ride_on_a_decode_entry_within_the_budget():
    sched = make_sched(num_blocks=32, bs=4, max_num_batched_tokens=5)
    req = new_req("a", 3, max_tokens=10)
    sched.add_request(req)
    out = sched.schedule()
    sched.update(out, {"a": [50]})
    req.draft_token_ids = [1, 2, 3, 4, 5, 6]
    out = sched.schedule()
    (s,) = out.scheduled
    # one known token + 4 drafts: the budget of 5 trims the drafts, never the known token
    assert (s.num_tokens, s.num_draft_tokens, s.token_ids) == (5, 4, [50, 1, 2, 3, 4])
    assert s.start_pos == 3 and s.sample and len(s.block_ids) == 2  # positions 3..7: two blocks
    sched.update(out, {"a": [1, 2, 9]})  # two accepted, then a correction
    assert req.output_token_ids == [50, 1, 2, 9]
    assert req.num_computed_tokens == 6 and req.num_tokens == 7
    assert len(sched.kv.block_ids("a")) == 2  # 7 positions: blocks past them freed
    assert sched.kv.pool.num_free == 30


def test_a_prompt_chunk_never_carries_drafts():
    sched = make_sched(num_blocks=32, bs=4, max_num_batched_tokens=64)
    req = new_req("a", 6, max_tokens=4)
    sched.add_request(req)
    req.draft_token_ids = [1, 2]  # stale drafts on a request still prefilling are ignored
    (s,) = sched.schedule().scheduled
    assert s.num_draft_tokens == 0 and s.num_tokens == 6


def test_missing_blocks_drop_the_drafts_before_preempting_anyone():
    sched = make_sched(num_blocks=4, bs=4, caching=False, max_num_batched_tokens=64)
    a, b = new_req("a", 4, max_tokens=20), new_req("b", 3, max_tokens=20)
    for r in (a, b):
        sched.add_request(r)
    out = sched.schedule()
    sched.update(out, {"a": [60], "b": [61]})  # a: 4 computed (1 block), b: 3 computed (1 block)
    assert sched.kv.pool.num_free == 2
    a.draft_token_ids = [1, 2, 3, 4, 5, 6, 7, 8]  # positions 4..12 need 3 more blocks; 2 are free
    out = sched.schedule()
    assert not out.preempted and sched.num_preemptions == 0
    entries = {s.request_id: s for s in out.scheduled}
    assert entries["a"].num_draft_tokens == 0 and entries["a"].num_tokens == 1
    assert entries["b"].num_tokens == 1


def test_eos_inside_an_accepted_run_finishes_and_frees_everything():
    sched = make_sched(num_blocks=16, bs=4)
    req = new_req("a", 3, max_tokens=10, ignore_eos=False)
    sched.add_request(req)
    sched.update(sched.schedule(), {"a": [50]})
    req.draft_token_ids = [51, 2, 53]
    out = sched.schedule()
    sched.update(out, {"a": [51, 2, 53, 54]})  # all accepted, EOS (2) second: the rest is dropped
    assert req.output_token_ids == [50, 51, 2] and req.is_finished
    assert_pool_full(sched)


def test_max_tokens_inside_an_accepted_run_cuts_the_output():
    sched = make_sched(num_blocks=16, bs=4)
    req = new_req("a", 3, max_tokens=3)
    sched.add_request(req)
    sched.update(sched.schedule(), {"a": [50]})
    req.draft_token_ids = [51, 52, 53]
    sched.update(sched.schedule(), {"a": [51, 52, 53, 54]})
    assert req.output_token_ids == [50, 51, 52] and req.finish_reason.value == "length"
    assert_pool_full(sched)


def test_truncating_a_cached_block_is_refused():
    sched = make_sched(num_blocks=16, bs=4)
    req = new_req("a", 9, max_tokens=4)
    sched.add_request(req)
    sched.update(sched.schedule(), {"a": [50]})  # 9 computed: two full blocks hashed
    with pytest.raises(RuntimeError, match="cached blocks"):
        sched.kv.truncate("a", 4)


def test_more_tokens_than_drafts_plus_one_is_an_error():
    sched = make_sched(num_blocks=16, bs=4)
    req: Request = new_req("a", 3, max_tokens=10)
    sched.add_request(req)
    sched.update(sched.schedule(), {"a": [50]})
    req.draft_token_ids = [1]
    out = sched.schedule()
    with pytest.raises(ValueError, match="2 tokens emitted for 1 draft|3 tokens emitted for 1 draft"):
        sched.update(out, {"a": [1, 2, 3]})
