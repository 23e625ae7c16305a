"""Attention offload with the model worker's engine owning the shards' pages (a shard's page b
is block b of the engine's sub-pool for it): prefix caching (a request goes to the shard that
holds its cached prefix, elsewhere without the hit when that shard is full), speculative
decoding (verify rows of q_len 1 + k reach the shards; a rollback is the engine's block-table
truncation), and the pools back to full after cancels and preemption. Greedy outputs equal
engine.LLM's with the same features, token for token (fp32 tiny model)."""

from __future__ import annotations

import pytest

from attention_offload.build import build_shard
from attention_offload.offloaded import OffloadedEngine
from attention_offload.transport import LoopbackTransport
from engine.config import SpeculativeConfig
from engine.kv_cache.partitioned import PartitionedBlockPool, PartitionedKVCacheManager
from engine.llm import LLM, build_engine_config
from engine.models.self_draft import build_self_draft
from engine.request import FinishReason, Request, SamplingParams
from tests.unit.attention_offload.test_attention_offload import assert_pools_full
from tests.unit.engine.test_scheduler import new_req
from tests.unit.engine.test_spec_engine import PROMPTS as SPEC_PROMPTS
from tests.unit.engine.test_spec_engine import ScriptedProposer

BS = 4  # small blocks: prefixes of several blocks, rollbacks across block boundaries
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PREFIX_A = [20 + (7 * i) % 90 for i in range(24)]  # 6 full blocks
PREFIX_B = [130 + (5 * i) % 70 for i in range(24)]
WAVE1 = [PREFIX_A + [1, 2, 3], PREFIX_B + [4, 5]]
WAVE2 = [PREFIX_A + [7, 8], PREFIX_A + [9], PREFIX_B + [11, 12, 13]]


@pytest.fixture(scope="module")
def target(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama", num_hidden_layers=4)


def offloaded(model: str, blocks: list[int], rotation: int, **opts) -> OffloadedEngine:
    core = {k: opts.pop(k) for k in ("proposer", "policy") if k in opts}
    cfg = build_engine_config(model, num_blocks=sum(blocks), block_size=BS, **opts)
    shards = [build_shard(cfg, n, "sdpa") for n in blocks]
    return OffloadedEngine(cfg, LoopbackTransport(shards), blocks, rotation, **core)


def run_wave(engine: OffloadedEngine, prompts, prefix: str, params=GREEDY) -> tuple[list[list[int]], dict[str, int]]:
    """Runs the prompts to the end -> (outputs, each request's shard at its first step)."""
    reqs = [Request(f"{prefix}{i}", list(p), params) for i, p in enumerate(prompts)]
    for r in reqs:
        engine.add_request(r)
    shards: dict[str, int] = {}
    while engine.has_work():
        engine.step()
        for r in reqs:
            s = engine.shard_of(r.request_id)
            if s is not None:
                shards.setdefault(r.request_id, s)
    return [r.output_token_ids for r in reqs], shards


# ------------------------------------------------------------------ prefix caching


def test_a_cached_prefix_places_the_request_on_its_partition_unless_that_one_is_full():
    kv = PartitionedKVCacheManager(PartitionedBlockPool([6, 4], enable_prefix_caching=True), BS)
    prompt = list(range(100, 108))
    a = new_req("a", [*prompt, 1])  # 9 tokens: 2 full blocks can be hit
    assert kv.allocate(a, 9, kv.computed_prefix(a)) and kv.partition_of("a") == 0  # most free: 6 vs 4
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    kv.free("a")  # finished: its 2 full blocks stay cached (free, evictable)
    f = new_req("f", 12)
    assert kv.allocate(f, 12) and kv.partition_of("f") == 0  # 6 free vs 4: 3 never-used blocks
    # partition 0: 3 free (2 of them a's cached blocks), partition 1: 4 free. b has a's prefix:
    # it goes to partition 0, where its pages are, not to the most free partition
    b = new_req("b", [*prompt, 2])
    prefix = kv.computed_prefix(b)
    assert len(prefix[0]) == 2 and {kv.pool.partition_of(x) for x in prefix[0]} == {0}
    assert kv.allocate(b, 1, prefix) and kv.partition_of("b") == 0
    assert kv.block_ids("b")[:2] == prefix[0] and kv.pool.prefix_hits == 2
    assert kv.pool.num_free_in(0) == 0
    # c has the prefix too, but partition 0 is full: c goes elsewhere, without the hit
    c = new_req("c", [*prompt, 3])
    assert kv.computed_prefix(c) == ([], [])
    assert kv.allocate(c, 9) and kv.partition_of("c") == 1 and kv.pool.prefix_hits == 2
    b.num_computed_tokens = 9
    kv.cache_full_blocks(b)
    for rid in ("b", "c", "f"):
        kv.free(rid)
    assert kv.pool.num_free == kv.pool.num_blocks == 10 and not any(kv.pool.ref_counts) and not kv.partition


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("rotation", [1, 2])
def test_prefix_cached_requests_go_to_their_shard_and_equal_llm(tiny_checkpoint, target, rotation, family):
    if family != "llama":
        target = tiny_checkpoint(family, num_hidden_layers=4)
    llm = LLM(target, skip_tokenizer_init=True, enable_prefix_caching=True, num_blocks=64, block_size=BS)
    ref1 = [o.token_ids for o in llm.generate(WAVE1, GREEDY)]
    ref2 = [o.token_ids for o in llm.generate(WAVE2, GREEDY)]
    ref_hits = llm.engine.stats().prefix_cache_hits
    assert ref_hits == 3 * 6  # every wave-2 request hits its prefix's 6 blocks

    engine = offloaded(target, [32, 32], rotation, enable_prefix_caching=True)
    out1, shards1 = run_wave(engine, WAVE1, "w1-")
    assert shards1 == {"w1-0": 0, "w1-1": 1}  # A's prefix on shard 0, B's on shard 1
    assert engine.core.stats().prefix_cache_hits == 0
    out2, shards2 = run_wave(engine, WAVE2, "w2-")
    # each goes to the shard holding its prefix (w2-1 while shard 1 has more free blocks)
    assert shards2 == {"w2-0": 0, "w2-1": 0, "w2-2": 1}
    assert out1 == ref1 and out2 == ref2
    assert engine.core.stats().prefix_cache_hits == ref_hits > 0
    assert engine.core.cached_block_hashes()  # the prefix cache still names pages on the shards
    assert_pools_full(engine)
    engine.transport.close()


# ------------------------------------------------------------------ speculative decoding

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "policy": "fixed", "prompt_lookup_min": 1}
SPEC_GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def spec_reference(target) -> list[list[int]]:
    llm = LLM(target, skip_tokenizer_init=True, num_blocks=256, block_size=BS, speculative_config=NGRAM)
    out = [o.token_ids for o in llm.generate(SPEC_PROMPTS, SPEC_GREEDY)]
    plain = LLM(target, skip_tokenizer_init=True, num_blocks=256, block_size=BS)
    assert out == [o.token_ids for o in plain.generate(SPEC_PROMPTS, SPEC_GREEDY)]  # speculation is exact
    return out


@pytest.mark.parametrize("rotation", [1, 2])
def test_ngram_speculation_with_offload_equals_llm(target, spec_reference, rotation):
    engine = offloaded(target, [128, 128], rotation, speculative_config=NGRAM)
    attends = []
    real_begin = engine.transport.begin
    engine.transport.begin = lambda s, b: attends.append(max(b.q_lens, default=0)) or real_begin(s, b)
    out, shards = run_wave(engine, SPEC_PROMPTS, "s", SPEC_GREEDY)
    assert out == spec_reference
    st = engine.core.spec_stats()
    assert st.proposed_tokens > 0 and 0 < st.accepted_tokens < st.proposed_tokens  # rollbacks happened
    assert set(shards.values()) == {0, 1}
    assert max(attends) > 1  # verify rows (q_len 1 + k) reached the shards
    assert_pools_full(engine)
    engine.transport.close()


def test_draft_model_speculation_with_offload_equals_llm(target, spec_reference, tmp_path):
    """The draft model's own KV stays local on the model worker; the target's is on the shards."""
    draft = build_self_draft(target, 2, str(tmp_path / "d2"))
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "policy": "fixed", "model": draft}
    engine = offloaded(target, [128, 128], 2, speculative_config=spec)
    out, _ = run_wave(engine, SPEC_PROMPTS, "d", SPEC_GREEDY)
    assert out == spec_reference
    st = engine.core.spec_stats()
    assert st.proposed_tokens > 0 and st.accepted_tokens > 0
    assert_pools_full(engine)
    assert st.draft_kv is not None and st.draft_kv.free_blocks == st.draft_kv.total_blocks
    engine.transport.close()


# ------------------------------------------------------------------ the pools after cancels and preemption


def test_rejections_prefix_caching_preemption_and_cancels_leave_the_pools_full(target, spec_reference):
    """Scripted rejections at every offset, prefix caching on, two shards too small for every
    request at once (the engine preempts; a recomputed request hits its own cached blocks), one
    request cancelled mid-run: the others equal the reference, and every shard's sub-pool is
    free again."""
    refs = {tuple(p): o for p, o in zip(SPEC_PROMPTS, spec_reference, strict=True)}
    spec = SpeculativeConfig("ngram", 6, policy="fixed")
    engine = offloaded(
        target,
        [20, 20],  # a request (<= 71 tokens) fits one shard; all five do not fit both
        2,
        enable_prefix_caching=True,
        max_num_batched_tokens=32,
        speculative_config=spec,
        proposer=ScriptedProposer(refs, seed=1),
    )
    reqs = [Request(f"p{i}", list(p), SPEC_GREEDY) for i, p in enumerate(SPEC_PROMPTS)]
    for r in reqs:
        engine.add_request(r)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if steps == 6:
            assert engine.abort("p1") is not None
    assert engine.core.stats().preemptions > 0  # the shards were really full: not vacuous
    st = engine.core.spec_stats()
    assert 0 < st.accepted_tokens < st.proposed_tokens
    for i, r in enumerate(reqs):
        if i == 1:
            assert (
                r.finish_reason == FinishReason.ABORT
                and r.output_token_ids == spec_reference[1][: len(r.output_token_ids)]
            )
        else:
            assert r.output_token_ids == spec_reference[i], i
    # recomputed (preempted) requests found their own full blocks still cached on their shard
    assert engine.core.stats().prefix_cache_hits > 0
    assert_pools_full(engine)
    engine.transport.close()
