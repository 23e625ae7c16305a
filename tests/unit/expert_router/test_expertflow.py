"""ExpertFlow: the cache policies on routing logs, and the engine with a fast tier of 25% of
the experts producing exactly the local dispatcher's tokens (a miss only costs a load)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM
from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.request import Request
from expert_router.expertflow import ExpertCacheConfig, ExpertCacheCore, ExpertFlowDispatcher, PathPredictor, simulate
from expert_router.routing_log import record_routing
from expert_router.synthetic import PlantedStructure, planted_log
from tests.correctness.hf_ref import greedy_params, random_prompts

STRUCT = PlantedStructure(num_experts=16, top_k=2, num_layers=4, num_groups=4)


@pytest.mark.parametrize("slots", [4, 8, 12], ids=["25%", "50%", "75%"])
def test_expertflow_beats_lru_and_lfu_on_a_structured_log(slots: int) -> None:
    """SYNTHETIC structure; the predictor is fitted on one log and replayed on another drawn
    from the same planted model."""
    train, _ = planted_log(STRUCT, 40, 30, seed=1)
    held_out, _ = planted_log(STRUCT, 12, 30, seed=1, sample_seed=7)
    predictor = PathPredictor(train)
    ef = simulate(held_out, slots, "expertflow", predictor)
    lru = simulate(held_out, slots, "lru", None)
    lfu = simulate(held_out, slots, "lfu", None)
    print(
        f"slots {slots}/16: hit ratio expertflow {ef.hit_ratio:.3f} (prefetch accuracy "
        f"{ef.prefetch_accuracy:.3f}) lru {lru.hit_ratio:.3f} lfu {lfu.hit_ratio:.3f}"
    )
    assert ef.hit_ratio > lru.hit_ratio and ef.hit_ratio > lfu.hit_ratio
    assert ef.prefetches > 0 and 0 < ef.prefetch_used <= ef.prefetches


def test_lru_evicts_the_least_recently_used_and_counts_hits() -> None:
    loads: list[tuple[int, int, int]] = []
    core = ExpertCacheCore(1, 4, 2, "lru", load=lambda li, e, slot: loads.append((li, e, slot)))
    for ids in ([[0, 1]], [[0]], [[2]], [[1]]):
        core.access(0, np.array(ids))
    # 0, 1 loaded; 0 hit; 2 evicts 1 (older than 0); 1 evicts 0
    assert [e for _, e, _ in loads] == [0, 1, 2, 1]
    assert (core.stats.hits, core.stats.misses, core.stats.evictions) == (1, 4, 2)


def test_a_batch_needing_more_experts_than_slots_runs_in_waves() -> None:
    ran: list[tuple[int, int]] = []
    core = ExpertCacheCore(1, 6, 2, "lfu")
    core.access(0, np.array([[0, 1], [2, 3], [4, 5]]), run=lambda e, slot: ran.append((e, slot)))
    assert [e for e, _ in ran] == [0, 1, 2, 3, 4, 5]  # each ran while resident, in id order
    assert core.stats.misses == 6


def test_bad_cache_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="expert_cache_slots"):
        ExpertCacheCore(1, 4, 5, "lru")
    with pytest.raises(ValueError, match="needs a PathPredictor"):
        ExpertCacheCore(1, 4, 2, "expertflow")
    with pytest.raises(ValueError, match="policy"):
        ExpertCacheCore(1, 4, 2, "fifo")


@pytest.mark.parametrize("policy", ["expertflow", "lru"])
def test_engine_with_a_quarter_of_the_experts_cached_matches_local_experts(tiny_checkpoint, policy: str) -> None:
    ckpt = tiny_checkpoint("mixtral", num_local_experts=8)
    predictor = PathPredictor(record_routing(ckpt, random_prompts(seed=31), max_tokens=8))
    options = {"block_size": 8, "num_blocks": 96, "attention_backend": "sdpa"}
    dispatcher = ExpertFlowDispatcher(ExpertCacheConfig(2, policy, predictor if policy == "expertflow" else None))
    engine = EngineCore(build_engine_config(ckpt, **options), dispatcher=dispatcher)
    prompts = random_prompts(seed=32)
    reqs = [Request(f"r{i}", p, greedy_params(16)) for i, p in enumerate(prompts)]
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        engine.step()
    want = [o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **options).generate(prompts, greedy_params(16))]
    assert [list(r.output_token_ids) for r in reqs] == want
    tiers = dispatcher.tiers
    assert tiers is not None
    st = tiers.core.stats
    print(
        f"engine, 2 of 8 experts cached, {policy}: hit ratio {st.hit_ratio:.3f}, loads {st.loads}, "
        f"modelled load time {tiers.modelled_load_s * 1e3:.3f} ms at 25 GB/s"
    )
    assert st.misses > 0 and tiers.load_bytes > 0
    assert engine.pool.num_free == engine.pool.num_blocks > 0


def test_the_gate_corrects_a_wrong_prediction() -> None:
    """The predictor expects expert 0 at layer 1 (always seen after expert 0 at layer 0); the
    gate picks 2 and 3 instead: the prefetched 0 is the next victim, not the chosen ones."""
    from expert_router.routing_log import RoutingLog

    ids = np.array([[[0, 1], [0, 1]]] * 20, dtype=np.int16)  # [N, L=2, k=2]
    log = RoutingLog("t", 4, 2, (0, 1), ids, np.array([0, 20]))
    core = ExpertCacheCore(2, 4, 3, "expertflow", PathPredictor(log, smoothing=0.01))
    core.access(0, np.array([[0, 1]]))  # predicts {0, 1} for layer 1 and prefetches them
    assert set(core.layers[1].slot_of) == {0, 1} and core.stats.prefetches == 2
    core.access(1, np.array([[2, 3]]))  # the gate disagrees: 2 fills the free slot, 3 evicts
    assert {2, 3} <= set(core.layers[1].slot_of)
    score = core.layers[1].score
    assert score[2] > score[0] and score[3] > score[1]  # chosen outrank predicted-unchosen
