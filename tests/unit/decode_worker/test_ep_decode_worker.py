"""Decode workers as the ranks of an expert-parallel group, in-process: built by
build_decode_worker for their rank, the group formed by the controller's form_group over
their handles, requests on either rank served in lock-step with tokens equal to engine.LLM's,
the EP rank in stats; and a rank that dies fails its peer's requests within the group's
timeout instead of hanging it."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.control.groups import form_group
from cluster.control.handles import local_decode
from decode_worker.build import build_decode_worker
from engine import LLM, SamplingParams
from engine.types import EngineStopped, RequestSpec
from expert_router.group import EPRankOptions, EPSetupError

ENGINE = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa", "skip_tokenizer_init": True}
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 59)), [5, 9, 2, 7]]


def _drain(w, rid: str, timeout_s: float = 120.0):
    tokens, cursor, end = [], 0, time.monotonic() + timeout_s
    while time.monotonic() < end:
        c = w.read(rid, cursor, timeout=1.0)
        tokens += c.token_ids
        cursor += len(c.token_ids)
        if c.finished:
            return tokens, c.error
    raise AssertionError(f"{rid} did not finish within {timeout_s}s")


def _group(ckpt: str, timeout_s: float):
    workers = [
        build_decode_worker(ckpt, ENGINE, None, worker_id=f"ep-{r}", role="mixed", ep=EPRankOptions(2, r))
        for r in range(2)
    ]
    handles = [local_decode(w.worker_id, w) for w in workers]
    specs = asyncio.run(form_group("ep/test", handles, backend="gloo", timeout_s=timeout_s))
    assert [(s.rank, s.world_size) for s in specs] == [(0, 2), (1, 2)]
    return workers


def test_two_ep_decode_workers_serve_requests_on_either_rank_as_llm(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("mixtral")
    workers = _group(ckpt, timeout_s=30.0)
    try:
        for i, p in enumerate(PROMPTS):  # 3 on rank 0, 1 on rank 1: ranks differ in load
            workers[0 if i < 3 else 1].generate_local(RequestSpec(f"r{i}", p, PARAMS))
        got = [_drain(workers[0 if i < 3 else 1], f"r{i}") for i in range(len(PROMPTS))]
        reports = [w.stats().expert_parallel for w in workers]
        assert all(w.loop.error is None for w in workers), [w.loop.error for w in workers]
    finally:
        for w in workers:
            w.shutdown()
    # rank 0's shutdown stopped the group; rank 1, not shutting down yet, can serve no more
    assert workers[0].loop.error is None
    assert isinstance(workers[1].loop.error, EngineStopped) and "group stopped" in str(workers[1].loop.error)
    assert [e for _, e in got] == [None] * len(PROMPTS)
    want = [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, PARAMS)]
    assert [t for t, _ in got] == want
    assert [(r.rank, r.world_size, r.connected) for r in reports] == [(0, 2, True), (1, 2, True)]
    assert [r.cache for r in reports] == [None, None]  # no expert_cache_slots: no fast-tier report
    assert all(r.tokens > 0 and r.rounds > 0 and r.dispatch_bytes > 0 for r in reports)


def test_a_dead_rank_fails_its_peers_requests_within_the_timeout(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("mixtral")
    workers = _group(ckpt, timeout_s=3.0)
    survivor, dead = workers
    try:
        survivor.generate_local(RequestSpec("long", PROMPTS[0], SamplingParams(max_tokens=10_000, ignore_eos=True)))
        survivor.read("long", 0, timeout=60.0)  # decoding in lock-step with the peer
        dead.runtime.stop()  # the peer's loop ends without the group's stop protocol (as a crash)
        t0 = time.monotonic()
        _, error = _drain(survivor, "long", timeout_s=60.0)
        assert time.monotonic() - t0 < 15.0  # the group's 3 s timeout, not a hang
        assert error is not None and "engine failed" in error  # the router's WORKER_LOST: fails over
        with pytest.raises(EngineStopped):
            survivor.ping()
    finally:
        for w in workers:
            w.shutdown()


def test_ep_settings_that_do_not_fit_the_model_are_refused_naming_the_field(tiny_checkpoint) -> None:
    with pytest.raises(EPSetupError, match="^experts: .*dense model"):
        build_decode_worker(tiny_checkpoint("llama"), ENGINE, None, ep=EPRankOptions(2, 0))
    moe = tiny_checkpoint("mixtral")  # 4 experts
    with pytest.raises(EPSetupError, match=r"^experts: must be >= 2 and divide the model's 4 routed experts, got 3"):
        build_decode_worker(moe, ENGINE, None, ep=EPRankOptions(3, 0))
    with pytest.raises(EPSetupError, match=r"^expert_cache_slots: must be in \[1, 2\]"):
        build_decode_worker(moe, ENGINE, None, ep=EPRankOptions(2, 0, cache_slots=3))
    plain = build_decode_worker(moe, ENGINE, None)
    try:
        with pytest.raises(ValueError, match="not an expert-parallel worker"):
            plain.join_group(None)  # type: ignore[arg-type]
        assert plain.stats().expert_parallel is None
    finally:
        plain.shutdown()


def test_ep_workers_with_a_placement_file_and_an_expert_cache_serve_as_llm(tiny_checkpoint) -> None:
    """An s-EG-style (non-contiguous) placement and a one-slot LRU fast tier per rank change
    where experts sit and what is resident, never the tokens."""
    ckpt = tiny_checkpoint("mixtral")  # 4 experts in each of 2 layers
    placement = '{"world_size": 2, "owners": {"0": [0, 1, 0, 1], "1": [1, 0, 0, 1]}}'
    workers = [
        build_decode_worker(
            ckpt,
            ENGINE,
            None,
            worker_id=f"ep-{r}",
            role="mixed",
            ep=EPRankOptions(2, r, placement_json=placement, cache_slots=1),
        )
        for r in range(2)
    ]
    assert workers[0].ep.dispatcher.placement.experts_of(0, 0) == (0, 2)
    asyncio.run(form_group("ep/cached", [local_decode(w.worker_id, w) for w in workers], backend="gloo", timeout_s=30))
    try:
        before = [w.stats().expert_parallel.cache for w in workers]
        for i, p in enumerate(PROMPTS):
            workers[i % 2].generate_local(RequestSpec(f"c{i}", p, PARAMS))
        got = [_drain(workers[i % 2], f"c{i}") for i in range(len(PROMPTS))]
        after = [w.stats().expert_parallel.cache for w in workers]
    finally:
        for w in workers:
            w.shutdown()
    assert [e for _, e in got] == [None] * len(PROMPTS)
    assert [t for t, _ in got] == [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, PARAMS)]
    assert all(w.ep.dispatcher.tiers is not None for w in workers)  # the fast tier ran
    # the fast tier's counters in stats(): zeros before, moved after (1 slot of a 2-expert
    # share: some access must miss and load; LRU has no predictor, so no prefetches)
    assert [(c.slots, c.hits, c.misses, c.load_bytes) for c in before] == [(1, 0, 0, 0)] * 2
    for c in after:
        assert c.misses > 0 and c.hits > 0, c
        assert c.load_bytes > 0 and c.load_seconds > 0 and c.copy_seconds > 0, c
        assert (c.prefetches, c.prefetch_used, c.prefetch_accuracy) == (0, 0, 0.0), c
        assert 0 < c.hit_ratio < 1


def test_ep_workers_with_a_routing_log_run_expertflow_prefetch_and_serve_as_llm(tiny_checkpoint, tmp_path) -> None:
    """With the pool's routing log, an EP rank's fast tier is ExpertFlow's (path predictor,
    prefetch, replacement by predicted use): its prefetches show in stats, the tokens do not move."""
    from expert_router.routing_log import record_routing

    ckpt = tiny_checkpoint("mixtral")
    path = str(tmp_path / "route.npz")
    record_routing(ckpt, PROMPTS, max_tokens=6).save(path)
    with open(path, "rb") as f:
        log_bytes = f.read()
    with pytest.raises(EPSetupError, match=r"^expert_routing_log: not a routing log"):
        build_decode_worker(ckpt, ENGINE, None, ep=EPRankOptions(2, 0, cache_slots=1, routing_log=b"junk"))
    workers = [
        build_decode_worker(
            ckpt,
            ENGINE,
            None,
            worker_id=f"ep-{r}",
            role="mixed",
            ep=EPRankOptions(2, r, cache_slots=1, routing_log=log_bytes),
        )
        for r in range(2)
    ]
    assert all(w.ep.dispatcher.cache.policy == "expertflow" and w.ep.dispatcher.cache.predictor for w in workers)
    asyncio.run(form_group("ep/flow", [local_decode(w.worker_id, w) for w in workers], backend="gloo", timeout_s=30))
    try:
        for i, p in enumerate(PROMPTS):
            workers[i % 2].generate_local(RequestSpec(f"f{i}", p, PARAMS))
        got = [_drain(workers[i % 2], f"f{i}") for i in range(len(PROMPTS))]
        caches = [w.stats().expert_parallel.cache for w in workers]
    finally:
        for w in workers:
            w.shutdown()
    assert [e for _, e in got] == [None] * len(PROMPTS)
    assert [t for t, _ in got] == [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, PARAMS)]
    assert sum(c.prefetches for c in caches) > 0, caches
    assert all(c.prefetch_used <= c.prefetches and c.hits + c.misses > 0 for c in caches), caches
