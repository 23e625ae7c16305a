"""Attention offload in one process: the split seam, shards, the remote backend, rotation,
transports (loopback and gloo) and the shards' pages across the request lifecycle.

Greedy output of the model worker is compared token by token with ``engine.LLM`` built with
the same cache settings (the fraction is asserted: 100%, the shapes match exactly)."""

from __future__ import annotations

import threading

import pytest
import torch

from attention_offload.build import build_loopback, build_shard, shard_layout
from attention_offload.dist_transport import DistAttentionTransport, serve_shard
from attention_offload.offloaded import OffloadedEngine
from attention_offload.remote import RemoteAttentionBackend
from attention_offload.shard import ShardBatch
from engine.attention.backend import AttentionMetadata, EagerSubmit, SplitAttentionBackend, split_backend
from engine.attention.sdpa import TorchSDPABackend
from engine.kv_cache.paged_cache import PagedKVCache
from engine.llm import LLM, build_engine_config
from engine.models.llama import micro_batches
from engine.parallel import CommunicationError
from engine.request import Request, SamplingParams
from tests.unit.engine.gloo_ranks import gloo_comms

BLOCK = 8
BLOCKS = 48  # per engine; split evenly between the shards
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [[3 + i, 17, 33 + 2 * i, 40, 9 + i] * (1 + i) for i in range(5)]  # 5 .. 25 tokens


def config(model: str, num_blocks: int = BLOCKS, **opts):
    return build_engine_config(model, enable_prefix_caching=False, num_blocks=num_blocks, block_size=BLOCK, **opts)


def reference(model: str, num_blocks: int = BLOCKS, prompts=PROMPTS, **opts) -> list[list[int]]:
    llm = LLM(
        model, skip_tokenizer_init=True, enable_prefix_caching=False, num_blocks=num_blocks, block_size=BLOCK, **opts
    )
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


def run(engine: OffloadedEngine, prompts=PROMPTS) -> list[list[int]]:
    reqs = [Request(f"r{i}", list(p), GREEDY) for i, p in enumerate(prompts)]
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    return [r.output_token_ids for r in reqs]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> float:
    total = sum(len(r) for r in ref)
    same = sum(a == b for o, r in zip(ours, ref, strict=True) for a, b in zip(o, r, strict=False))
    return same / total


def assert_pools_full(engine: OffloadedEngine) -> None:
    """Every shard's sub-pool at the engine is free again (the shards' pages are its blocks) and
    no shard holds a live batch context."""
    t = engine.transport
    for s in range(t.num_shards):
        st = t.stats(s)
        assert st.total_blocks == engine.capacity[s] > 0 and st.live_contexts == 0, f"shard {s}: {st}"
    assert engine.used_blocks() == [0] * t.num_shards
    pool = engine.core.pool
    assert pool.num_free == pool.num_blocks > 0 and not any(pool.ref_counts)  # 0 of 0 would not be "full"
    assert not engine.core.kv.blocks


@pytest.fixture(scope="module")
def dense(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def moe(tiny_checkpoint) -> str:
    return tiny_checkpoint("qwen2_moe")


@pytest.fixture(scope="module")
def refs(dense, moe) -> dict[str, list[list[int]]]:
    return {"dense": reference(dense), "moe": reference(moe)}


# ------------------------------------------------------------------ the seam


def test_forward_only_backends_get_the_eager_adapter(tiny_checkpoint):
    cfg = config(tiny_checkpoint("llama"))
    cache = PagedKVCache(shard_layout(cfg), 4)
    sdpa = TorchSDPABackend(cache, native_decode=False)
    split = split_backend(sdpa)
    assert isinstance(split, EagerSubmit) and split.rotation == 1
    assert not isinstance(sdpa, SplitAttentionBackend)
    meta = AttentionMetadata(torch.tensor([0, 1]), [0, 2], [2], torch.tensor([[0]]), ["a"])
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    torch.testing.assert_close(split.submit(0, q, k, v, meta).wait(), sdpa.forward(0, q, k, v, meta))
    remote = RemoteAttentionBackend(_NoTransport(), [4], BLOCK)
    assert split_backend(remote) is remote and remote.rotation == 2


class _NoTransport:
    num_shards = 1


def test_micro_batches_are_contiguous_sequence_groups_of_even_tokens():
    # 4 sequences: a 6-token prompt chunk and three decodes
    meta = AttentionMetadata(
        torch.arange(9), [0, 6, 7, 8, 9], [6, 10, 11, 12], torch.zeros(4, 2, dtype=torch.long), ["a", "b", "c", "d"]
    )
    groups = micro_batches(meta, 2)
    assert [(a, b) for a, b, _ in groups] == [(0, 6), (6, 9)]
    assert groups[1][2].query_start_loc == [0, 1, 2, 3] and groups[1][2].request_ids == ["b", "c", "d"]
    assert groups[1][2].slot_mapping.tolist() == [6, 7, 8]
    decode = AttentionMetadata(torch.arange(5), list(range(6)), [4] * 5, torch.zeros(5, 1, dtype=torch.long))
    assert [(a, b) for a, b, _ in micro_batches(decode, 2)] == [(0, 3), (3, 5)]
    assert [(a, b) for a, b, _ in micro_batches(decode, 9)] == [(i, i + 1) for i in range(5)]


# ------------------------------------------------------------------ greedy output equals engine.LLM


@pytest.mark.parametrize("family", ["dense", "moe"])
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("rotation", [1, 2])
def test_greedy_output_equals_llm(family, shards, rotation, dense, moe, refs):
    model = dense if family == "dense" else moe
    engine = build_loopback(config(model), [BLOCKS // shards] * shards, rotation)
    out = run(engine)
    frac = agreement(out, refs[family])
    assert frac == 1.0, f"{family}, {shards} shard(s), rotation {rotation}: {frac:.2%} of tokens equal"
    if shards == 2:  # both shards held requests
        assert len({engine.shard_of(f"r{i}") for i in range(len(PROMPTS))} - {None}) == 0  # all freed
        assert all(engine.transport.stats(s).batches > 0 for s in range(2))  # both shards attended
    stats = engine.core.model.rotation_stats
    assert (stats.runs > 0) == (rotation > 1)
    assert_pools_full(engine)
    engine.transport.close()


def test_two_shards_split_the_requests(dense):
    engine = build_loopback(config(dense), [BLOCKS // 2] * 2, rotation=2)
    for i, p in enumerate(PROMPTS):
        engine.add_request(Request(f"r{i}", list(p), GREEDY))
    engine.step()
    placed = [engine.shard_of(f"r{i}") for i in range(len(PROMPTS))]
    assert set(placed) == {0, 1}, placed
    for s in range(2):  # a request's blocks all lie in its shard's partition of the engine's pool
        mine = [b for i in range(len(PROMPTS)) if placed[i] == s for b in engine.core.block_ids(f"r{i}")]
        assert {engine.core.pool.partition_of(b) for b in mine} == {s}
        assert engine.used_blocks()[s] == len(mine) and engine.transport.stats(s).batches >= 1  # 1 per micro-batch
    while engine.has_work():
        engine.step()
    assert_pools_full(engine)
    engine.transport.close()


# ------------------------------------------------------------------ bytes on the wire


@pytest.mark.parametrize(("shards", "rotation"), [(1, 1), (2, 2)])
def test_payload_bytes_equal_the_analytic_volume(dense, shards, rotation):
    cfg = config(dense)
    engine = build_loopback(cfg, [BLOCKS // shards] * shards, rotation)
    out = run(engine)
    mc = cfg.model
    tokens = sum(len(p) + len(o) - 1 for p, o in zip(PROMPTS, out, strict=True))  # rows through the model
    per_layer_token_out = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * 4  # q, k, v (fp32)
    per_layer_token_in = mc.num_heads * mc.head_dim * 4  # the attention output
    c = engine.transport.counters
    assert c.payload_out == tokens * mc.num_layers * per_layer_token_out
    assert c.payload_in == tokens * mc.num_layers * per_layer_token_in
    # the block tables: once per step and sequence (not per layer), ceil(context / block) ids
    # each; a prompt of P tokens and G outputs has contexts P (its prefill), P + 1 .. P + G - 1
    contexts = [n for p, o in zip(PROMPTS, out, strict=True) for n in [len(p), *range(len(p) + 1, len(p) + len(o))]]
    assert c.tables == sum(-(-n // BLOCK) for n in contexts) * 8
    assert c.control > c.tables
    engine.transport.close()


# ------------------------------------------------------------------ lifecycle


def test_cancel_mid_run_returns_the_pools_to_full(dense):
    engine = build_loopback(config(dense), [BLOCKS // 2] * 2, rotation=2)
    for i, p in enumerate(PROMPTS):
        engine.add_request(Request(f"r{i}", list(p), GREEDY))
    for _ in range(3):
        engine.step()
    held = sum(engine.used_blocks())
    assert held == sum(len(engine.core.block_ids(f"r{i}")) for i in range(len(PROMPTS))) > 0
    for i in range(0, len(PROMPTS), 2):
        engine.abort(f"r{i}")
    assert sum(engine.used_blocks()) == sum(len(engine.core.block_ids(f"r{i}")) for i in range(1, len(PROMPTS), 2))
    assert sum(engine.used_blocks()) < held
    while engine.has_work():
        engine.step()
    assert_pools_full(engine)
    for i in range(1, len(PROMPTS), 2):  # cancel what is left, then cancel again: no-ops
        engine.abort(f"r{i}")
    assert_pools_full(engine)
    engine.transport.close()


def test_preemption_recomputes_on_the_shard_and_matches_llm(dense):
    blocks = 12  # 96 token slots for 5 requests of up to 41 tokens: the engine preempts
    ref = reference(dense, num_blocks=blocks)
    engine = build_loopback(config(dense, num_blocks=blocks), [blocks], rotation=2)
    out = run(engine)
    assert engine.core.stats().preemptions > 0
    assert agreement(out, ref) == 1.0
    assert_pools_full(engine)
    engine.transport.close()


def test_shard_refuses_a_table_it_cannot_hold_and_an_unknown_context(dense):
    shard = build_shard(config(dense), num_blocks=2)
    with pytest.raises(ValueError, match="block table of 1 pages for 9 tokens"):
        shard.begin(ShardBatch(0, [9], [9], [[0]]))
    with pytest.raises(ValueError, match="block 2 is outside the shard's 2 pages"):
        shard.begin(ShardBatch(1, [9], [1], [[0, 2]]))
    with pytest.raises(ValueError, match="unknown batch context 5"):
        shard.attend_packed(5, 0, torch.zeros(1, 128))
    with pytest.raises(ValueError, match="equal-length"):
        ShardBatch(2, [5], [5], [])
    shard.begin(ShardBatch(3, [9], [9], [[1, 0]]))
    with pytest.raises(ValueError, match="context 3 is already live"):
        shard.begin(ShardBatch(3, [1], [1], [[0]]))
    assert shard.stats().live_contexts == 1 and shard.rows(3) == 9


def _attend_all(shard, ctx: int, seq_len: int, table: list[int], qkv: torch.Tensor) -> list[torch.Tensor]:
    """One context of ``qkv.shape[0]`` new tokens through every layer -> each layer's output."""
    shard.begin(ShardBatch(ctx, [seq_len], [qkv.shape[0]], [table]))
    return [shard.attend_packed(ctx, layer, qkv) for layer in range(shard.layout.num_layers)]


def test_the_shard_reads_pages_another_context_wrote_and_reuses_pages_without_a_release(dense):
    """The shard keeps no per-request state: a context naming pages an earlier one wrote reads
    that K/V (a prefix hit), and a page an earlier sequence left (freed at the engine) is
    rewritten by its new owner before it is read: the outputs equal a fresh shard's."""
    cfg = config(dense)
    mc = cfg.model
    width = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    a, c, b = torch.randn(9, width), torch.randn(2, width), torch.randn(5, width)
    shard = build_shard(cfg, 4, "sdpa")
    _attend_all(shard, 0, 9, [3, 1], a)  # request A: tokens 0..8 on pages 3, 1
    hit = _attend_all(shard, 1, 10, [3, 0], torch.cat([a[8:], c[1:]]))  # C: A's first block cached, 2 new
    reused = _attend_all(shard, 2, 5, [1], b)  # B: page 1 (A's, freed) reused
    fresh = _attend_all(build_shard(cfg, 4, "sdpa"), 0, 10, [3, 0], torch.cat([a[:9], c[1:]]))
    for layer in range(mc.num_layers):
        torch.testing.assert_close(hit[layer], fresh[layer][8:])
    fresh_b = _attend_all(build_shard(cfg, 4, "sdpa"), 0, 5, [2], b)
    for layer in range(mc.num_layers):
        torch.testing.assert_close(reused[layer], fresh_b[layer])
    st = shard.stats()
    assert (st.total_blocks, st.live_contexts, st.batches) == (4, 0, 3)


# ------------------------------------------------------------------ gloo transport


@pytest.mark.parametrize(("rotation", "num_prompts"), [(1, 5), (2, 5), (2, 2)])
def test_gloo_transport_two_shards_equal_llm_and_count_bytes(dense, refs, rotation, num_prompts):
    """(2, 2): one request per shard and per micro-batch, so each shard sits out one
    micro-batch of every step (an empty BEGIN keeps its loop in step)."""
    prompts = PROMPTS[:num_prompts]
    cfg = config(dense)
    comms = gloo_comms(world_size=3, timeout_s=60.0)
    shards = [build_shard(cfg, BLOCKS // 2, "sdpa") for _ in range(2)]
    served: list[int] = []
    errors: list[BaseException] = []

    def serve(rank: int) -> None:
        try:
            served.append(serve_shard(comms[rank], shards[rank - 1]))
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    transport = DistAttentionTransport(comms[0], [1, 2], shard_layout(cfg))
    engine = OffloadedEngine(cfg, transport, [BLOCKS // 2] * 2, rotation)
    try:
        out = run(engine, prompts)
        assert_pools_full(engine)
    finally:
        transport.close()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert agreement(out, refs["dense"][:num_prompts]) == 1.0
    mc = cfg.model
    tokens = sum(len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True))
    assert (
        transport.counters.payload_out
        == tokens * mc.num_layers * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * 4
    )
    assert transport.counters.payload_in == tokens * mc.num_layers * mc.num_heads * mc.head_dim * 4
    contexts = [n for p, o in zip(prompts, out, strict=True) for n in [len(p), *range(len(p) + 1, len(p) + len(o))]]
    assert transport.counters.tables == sum(-(-n // BLOCK) for n in contexts) * 8  # sent once per step
    assert len(served) == 2 and all(n > 0 for n in served)
    if num_prompts == 2:  # one ATTEND per layer and step on each shard, not one per micro-batch
        assert transport.counters.attends == len(out[0]) * mc.num_layers * 2


def test_a_failing_shard_fails_the_step_with_a_communication_error(dense):
    """The shard holds fewer pages than the model worker was told: its BEGIN names a page it
    does not have and raises, its loop ends, and the model worker's wait fails within the
    timeout; no token is produced."""
    cfg = config(dense)
    comms = gloo_comms(world_size=2, timeout_s=3.0)
    shard = build_shard(cfg, 1, "sdpa")  # one block: the first prompt does not fit
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            serve_shard(comms[1], shard)
        except BaseException as e:  # checked below
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    engine = OffloadedEngine(cfg, DistAttentionTransport(comms[0], [1], shard_layout(cfg)), [BLOCKS], 1)
    req = Request("r0", list(PROMPTS[4]), GREEDY)
    engine.add_request(req)
    with pytest.raises(CommunicationError):
        engine.step()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and "outside the shard's 1 pages" in str(errors[0])
    assert req.output_token_ids == []


def test_the_model_worker_holds_no_kv_pages_and_its_batch_is_bounded_by_the_shards(dense):
    """Capacity: the model worker's cache is a one-block placeholder, its pool accounts for the
    shards' pages, so a batch whose KV is far beyond the model worker's own cache runs."""
    engine = build_loopback(config(dense), [BLOCKS // 2] * 2, rotation=2)
    assert engine.core.cache.num_blocks == 1 and engine.core.pool.num_blocks == BLOCKS
    for i, p in enumerate(PROMPTS):
        engine.add_request(Request(f"r{i}", list(p), GREEDY))
    engine.step()
    held = sum(engine.used_blocks())
    assert held == BLOCKS - engine.core.pool.num_free > 1  # all of it on the shards
    while engine.has_work():
        engine.step()
    assert_pools_full(engine)
    engine.transport.close()
