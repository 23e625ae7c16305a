"""Expert parallelism in the engine step: an EP group of N ranks (threads of this process
over a loopback gloo group), each an EngineCore with data-parallel attention over its own
requests and 1/N of every MoE layer's routed experts (sharded loading), stepped in lock-step
(expert_router.dispatcher.run_lockstep).

Greedy tokens must equal engine.LLM's (local experts) on at least 99% of positions (the
fraction is printed), every token must be argmax-consistent with transformers' full forward,
each rank must hold exactly its share of experts, and every KV pool must be free afterwards.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.llm import build_engine_config
from engine.models.moe import LocalExperts
from engine.request import Request
from expert_router.dispatcher import run_lockstep
from expert_router.expertflow import ExpertCacheConfig, PathPredictor
from expert_router.group import build_ep_engine, contiguous_placement
from expert_router.routing_log import record_routing
from expert_router.seg import coactivation_placement, placement_traffic
from expert_router.sts import predict_rank
from tests.correctness.full_forward import check_argmax_consistent
from tests.correctness.hf_ref import greedy_params, hf_model, random_prompts
from tests.unit.engine.gloo_ranks import gloo_comms, run_ranks

MAX_NEW = 24
OPTIONS = {"block_size": 8, "num_blocks": 96, "attention_backend": "sdpa", "enable_prefix_caching": True}
CASES = [
    ("mixtral", 2),
    ("qwen2_moe", 2),
    ("qwen3_moe", 2),
    ("mixtral", 3),
    ("mixtral", 4),
    ("qwen2_moe", 4),
    ("qwen3_moe", 4),
]


def run_ep_group(
    ckpt: str, world: int, prompts: list[list[int]], max_new: int, placement=None, ranks_of=None, cache=None
):
    """Prompt i runs on rank ranks_of[i] (default i % world).
    -> (tokens per prompt, [(engine, dispatcher)] by rank)."""
    ranks_of = ranks_of or [i % world for i in range(len(prompts))]
    comms = gloo_comms(world, timeout_s=60.0)

    def rank(r: int):
        config = build_engine_config(ckpt, **OPTIONS)
        engine, dispatcher = build_ep_engine(config, comms[r], placement, cache)
        mine = []
        for i, p in enumerate(prompts):
            if ranks_of[i] == r:
                req = Request(f"p{i}", list(p), greedy_params(max_new))
                engine.add_request(req)
                mine.append((i, req))
        run_lockstep(engine, dispatcher)
        return {i: list(req.output_token_ids) for i, req in mine}, engine, dispatcher

    results = run_ranks(rank, world, timeout_s=600.0)
    tokens: dict[int, list[int]] = {}
    for got, _, _ in results:
        tokens.update(got)
    return [tokens[i] for i in range(len(prompts))], [(e, d) for _, e, d in results]


@pytest.mark.parametrize(("family", "world"), CASES, ids=[f"{f}-ep{w}" for f, w in CASES])
def test_ep_greedy_matches_local_experts_and_transformers(tiny_checkpoint, family: str, world: int) -> None:
    ckpt = tiny_checkpoint(family)
    prompts = random_prompts(seed=11) + random_prompts(seed=12, lengths=(5, 20, 33))
    got, ranks = run_ep_group(ckpt, world, prompts, MAX_NEW)

    local = LLM(ckpt, skip_tokenizer_init=True, **OPTIONS)
    want = [o.token_ids for o in local.generate(prompts, greedy_params(MAX_NEW))]
    total = sum(len(w) for w in want)
    equal = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    print(f"EP={world} {family}: greedy tokens equal to engine.LLM (local experts) at {equal}/{total}")
    assert all(len(g) == MAX_NEW for g in got)
    assert equal >= 0.99 * total

    labels = [f"{family} EP={world} prompt {i}" for i in range(len(prompts))]
    agreement = check_argmax_consistent(hf_model(ckpt), prompts, got, labels)
    print(f"EP={world} {family}: {agreement.exact} exact + {agreement.ties} ties vs transformers' full forward")

    full = local.engine.model
    placement = contiguous_placement(full.cfg, world)
    for r, (engine, dispatcher) in enumerate(ranks):
        pool = engine.pool
        assert pool.num_free == pool.num_blocks > 0 and not engine.has_work(), f"rank {r} leaked KV blocks"
        for layer in placement.layers:
            held = placement.experts_of(layer, r)
            mine = engine.model.layers[layer].mlp.experts
            assert isinstance(mine, LocalExperts) and mine.expert_ids == held
            ref = full.layers[layer].mlp.experts
            assert torch.equal(mine.w13, ref.w13[list(held)]) and torch.equal(mine.w2, ref.w2[list(held)])
        assert dispatcher.stats.rounds > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_ep_with_seg_placement_from_a_routing_log(tiny_checkpoint, family: str) -> None:
    """s-EG placement fitted on a routing log of calibration prompts (random gates: little
    structure, so this checks correctness, not savings): EP=2 greedy equal to engine.LLM."""
    ckpt = (
        tiny_checkpoint(family, num_local_experts=8) if family == "mixtral" else tiny_checkpoint(family, num_experts=8)
    )
    log = record_routing(ckpt, random_prompts(seed=21), max_tokens=8)
    placement = coactivation_placement(log, 2)
    prompts = random_prompts(seed=22)
    got, ranks = run_ep_group(ckpt, 2, prompts, MAX_NEW, placement)
    want = [
        o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **OPTIONS).generate(prompts, greedy_params(MAX_NEW))
    ]
    total = sum(len(w) for w in want)
    equal = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    seg = placement_traffic(log, placement, hidden=64, dtype_bytes=4)
    con = placement_traffic(log, contiguous_placement(ranks[0][0].model.cfg, 2), hidden=64, dtype_bytes=4)
    print(
        f"EP=2 {family} (8 experts) s-EG: greedy equal at {equal}/{total}; on its routing log distinct ranks/token "
        f"{seg.distinct_ranks_per_token:.3f} vs contiguous {con.distinct_ranks_per_token:.3f}"
    )
    assert equal >= 0.99 * total
    assert seg.distinct_ranks_per_token <= con.distinct_ranks_per_token + 1e-9
    for r, (engine, _) in enumerate(ranks):
        for layer in placement.layers:
            assert engine.model.layers[layer].mlp.experts.expert_ids == placement.experts_of(layer, r)


def test_ep_with_sts_request_placement_is_lossless(tiny_checkpoint) -> None:
    """s-TS places each request on the rank its prompt's routing votes for (s-EG placement):
    where a request runs changes, its tokens do not."""
    ckpt = tiny_checkpoint("qwen2_moe", num_experts=8)
    prompts = random_prompts(seed=41) + random_prompts(seed=42, lengths=(12, 40))
    placement = coactivation_placement(record_routing(ckpt, random_prompts(seed=40), max_tokens=8), 2)
    prompt_log = record_routing(ckpt, prompts, max_tokens=1)
    ranks_of = [predict_rank(placement, prompt_log.layers, seq) for seq in prompt_log.sequences()]
    got, ranks = run_ep_group(ckpt, 2, prompts, MAX_NEW, placement, ranks_of)
    want = [
        o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **OPTIONS).generate(prompts, greedy_params(MAX_NEW))
    ]
    total = sum(len(w) for w in want)
    equal = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    print(f"EP=2 qwen2_moe s-EG + s-TS placement {ranks_of}: greedy equal at {equal}/{total}")
    assert equal >= 0.99 * total
    assert sum(d.stats.tokens for _, d in ranks) > 0


def test_ep_with_idle_ranks_preemption_and_a_cancel(tiny_checkpoint) -> None:
    """EP=3, every request on rank 0 (ranks 1 and 2 only serve their experts), a KV pool
    small enough to force preemption, and one request aborted mid-decode: the others' tokens
    equal engine.LLM's, the aborted one stopped early, every pool is free afterwards."""
    ckpt = tiny_checkpoint("qwen3_moe")
    prompts = random_prompts(seed=51, lengths=(30, 41, 17, 52))
    options = {**OPTIONS, "num_blocks": 24, "enable_prefix_caching": False}
    comms = gloo_comms(3, timeout_s=60.0)

    def rank(r: int):
        engine, dispatcher = build_ep_engine(build_engine_config(ckpt, **options), comms[r])
        reqs = [Request(f"p{i}", list(p), greedy_params(MAX_NEW)) for i, p in enumerate(prompts)] if r == 0 else []
        for q in reqs:
            engine.add_request(q)

        def cancel(step: int) -> None:
            if r == 0 and step == 20:
                assert engine.abort("p1") is not None

        steps = run_lockstep(engine, dispatcher, cancel)
        return [list(q.output_token_ids) for q in reqs], engine, dispatcher, steps

    out = run_ranks(rank, 3, timeout_s=600.0)
    got, engine0, _, steps = out[0]
    assert engine0.scheduler.num_preemptions > 0
    want = [
        o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **options).generate(prompts, greedy_params(MAX_NEW))
    ]
    for i in (0, 2, 3):
        assert got[i] == want[i], f"prompt {i}"
    assert len(got[1]) < MAX_NEW and got[1] == want[1][: len(got[1])]
    for r, (_, engine, dispatcher, rank_steps) in enumerate(out):
        assert engine.pool.num_free == engine.pool.num_blocks > 0 and not engine.has_work()
        assert rank_steps == steps  # lock-step: every rank stepped as often
        assert dispatcher.stats.rounds > 0, f"rank {r} never served"
    assert out[1][2].stats.tokens == 0  # rank 1 routed no token of its own


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_ep_with_expertflow_at_a_quarter_of_each_ranks_experts(tiny_checkpoint, family: str) -> None:
    """EP=2 over 8 experts with s-EG placement; each rank runs its 4 experts through an
    ExpertFlow fast tier of ONE slot per layer (25% of its share), predictor from a routing
    log: tokens equal engine.LLM's and argmax-consistent with transformers; misses happened."""
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    ckpt = tiny_checkpoint(family, **{key: 8})
    log = record_routing(ckpt, random_prompts(seed=61), max_tokens=8)
    cache = ExpertCacheConfig(slots=1, policy="expertflow", predictor=PathPredictor(log))
    prompts = random_prompts(seed=62)
    got, ranks = run_ep_group(ckpt, 2, prompts, MAX_NEW, coactivation_placement(log, 2), cache=cache)
    want = [
        o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **OPTIONS).generate(prompts, greedy_params(MAX_NEW))
    ]
    total = sum(len(w) for w in want)
    equal = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    stats = [d.tiers.core.stats for _, d in ranks if d.tiers is not None]
    assert len(stats) == 2
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    print(
        f"EP=2 {family} + ExpertFlow 1 slot/layer/rank: equal {equal}/{total}, hit ratio {hits / (hits + misses):.3f}"
    )
    assert equal >= 0.99 * total and misses > 0
    labels = [f"{family} EP=2 ExpertFlow prompt {i}" for i in range(len(prompts))]
    check_argmax_consistent(hf_model(ckpt), prompts, got, labels)


def test_ep_with_a_dense_layer_places_only_the_moe_layers(tiny_checkpoint) -> None:
    """Qwen2-MoE with layer 0 dense (mlp_only_layers): the placement covers layer 1 only,
    the dense MLP is replicated, and EP=2 tokens equal engine.LLM's."""
    ckpt = tiny_checkpoint("qwen2_moe", mlp_only_layers=[0])
    prompts = random_prompts(seed=81)
    got, ranks = run_ep_group(ckpt, 2, prompts, MAX_NEW)
    want = [
        o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **OPTIONS).generate(prompts, greedy_params(MAX_NEW))
    ]
    assert got == want
    for engine, dispatcher in ranks:
        assert dispatcher.placement.layers == [1] and set(dispatcher.stats.per_layer_remote_pairs) <= {1}
        assert not hasattr(engine.model.layers[0].mlp, "experts")
