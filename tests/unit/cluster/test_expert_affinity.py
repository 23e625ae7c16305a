"""s-TS request placement in the router (cluster/control/expert_affinity.py): a request whose
prompt tokens' routing-log prior points at rank 1's experts goes to the rank-1 member (the
usual policy would not put it there), within the load cap; configuration errors name the
pool field."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cluster.config import ConfigError, PoolConfig, RouterConfig, ServeConfig
from cluster.control.expert_affinity import ExpertAffinity, build_expert_affinities
from cluster.control.routing import RoutingPolicy, WorkerLoad
from expert_router.placement import ExpertPlacement
from expert_router.routing_log import RoutingLog
from expert_router.token_prior import TokenPrior

TO_RANK1 = list(range(100, 110))  # tokens the log routed to experts 2 and 3 (rank 1's)
TO_RANK0 = list(range(200, 210))  # tokens the log routed to experts 0 and 1 (rank 0's)


def planted_log(num_experts: int = 4, layers: tuple[int, ...] = (0, 1)) -> RoutingLog:
    """Two sequences, every MoE layer: TO_RANK1 tokens -> experts (2, 3), TO_RANK0 -> (0, 1)."""
    ids = np.zeros((20, len(layers), 2), np.int16)
    ids[:10] = [2, 3]
    ids[10:] = [0, 1]
    tokens = np.array(TO_RANK1 + TO_RANK0, np.int32)
    return RoutingLog("planted", num_experts, 2, layers, ids, np.array([0, 10, 20]), token_ids=tokens)


def affinity() -> ExpertAffinity:
    return ExpertAffinity("ep", ExpertPlacement.contiguous(4, 2, [0, 1]), TokenPrior.fit(planted_log()))


def D(wid: str, **kw) -> WorkerLoad:
    return WorkerLoad(wid, "decode", **{"total_kv_blocks": 100, "free_kv_blocks": 100, **kw})


MEMBERS = [D("ep-0"), D("ep-1")]
LONG = 1000


def test_prior_points_at_rank1_members_and_usual_policy_does_not() -> None:
    usual = RoutingPolicy(RouterConfig(short_prompt_threshold=16))
    sts = RoutingPolicy(RouterConfig(short_prompt_threshold=16), affinities=[affinity()])
    # the usual policy ("kv", ties by id) puts it on ep-0; the prior on rank 1's member
    assert usual.route(LONG, MEMBERS, prompt_token_ids=TO_RANK1).decode_worker == "ep-0"
    assert sts.route(LONG, MEMBERS, prompt_token_ids=TO_RANK1).decode_worker == "ep-1"
    assert sts.route(LONG, MEMBERS, prompt_token_ids=TO_RANK0).decode_worker == "ep-0"
    # short prompts (prefilled on the decode worker) are placed the same way
    assert sts.route(3, MEMBERS, prompt_token_ids=TO_RANK1[:3]).decode_worker == "ep-1"
    # a mixed pool is chosen through the prefill step: the affinity applies there too
    mixed = [WorkerLoad(w.worker_id, "mixed", total_kv_blocks=100, free_kv_blocks=100) for w in MEMBERS]
    assert sts.route(LONG, mixed, prompt_token_ids=TO_RANK1).decode_worker == "ep-1"


def test_load_cap_is_fair_share_times_1_5() -> None:
    sts = RoutingPolicy(RouterConfig(short_prompt_threshold=16), affinities=[aff := affinity()])
    # 2 in flight on ep-1: cap 1.5 * (2 + 1) / 2 = 2.25 > 2, still ep-1
    assert sts.route(LONG, [D("ep-0"), D("ep-1", pending_requests=2)], (), TO_RANK1).decode_worker == "ep-1"
    # 3 in flight on ep-1: cap 1.5 * (3 + 1) / 2 = 3, ep-1 is at it -> ep-0
    assert sts.route(LONG, [D("ep-0"), D("ep-1", pending_requests=3)], (), TO_RANK1).decode_worker == "ep-0"
    assert (aff.placed, aff.capped) == (2, 1)
    # a stream of rank-1 requests never leaves a member above the cap
    counts = {"ep-0": 0, "ep-1": 0}
    for _ in range(40):
        loads = [D(w, pending_requests=n) for w, n in counts.items()]
        counts[sts.route(LONG, loads, (), TO_RANK1).decode_worker] += 1
        assert max(counts.values()) <= 1.5 * sum(counts.values()) / 2 + 1
    assert counts["ep-1"] > counts["ep-0"]


def test_unseen_tokens_fall_back_to_popularity_and_non_members_to_the_policy() -> None:
    aff = affinity()
    # equal popularity (20 choices each of 0/1 and 2/3): the lower ids win, rank 0
    np.testing.assert_array_equal(aff.prior.predict([5, 100])[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(aff.prior.predict([5, 100])[1], [[2, 3], [2, 3]])
    # a candidate outside the pool: no opinion (the usual policy decides)
    assert aff.choose([D("ep-1"), D("other-0")], TO_RANK1) is None
    assert aff.choose(MEMBERS, []) is None
    # an unhealthy member is not a candidate: the healthy one takes it
    sts = RoutingPolicy(RouterConfig(short_prompt_threshold=16), affinities=[aff])
    assert sts.route(LONG, [D("ep-0"), D("ep-1", healthy=False)], (), TO_RANK1).decode_worker == "ep-0"


def test_routing_log_round_trips_token_ids_and_old_logs_load(tmp_path) -> None:
    log = planted_log()
    log.save(str(tmp_path / "a.npz"))
    back = RoutingLog.load(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(back.token_ids, log.token_ids)
    old = RoutingLog(log.model, 4, 2, log.layers, log.ids, log.seq_offsets)  # no token ids
    old.save(str(tmp_path / "old.npz"))
    assert RoutingLog.load(str(tmp_path / "old.npz")).token_ids is None
    with pytest.raises(ValueError, match="no token_ids"):
        TokenPrior.fit(old)


def test_config_errors_name_the_field(tmp_path, tiny_checkpoint) -> None:
    with pytest.raises(ConfigError, match="expert_routing_log: needs experts > 1"):
        PoolConfig("d", "decode", 1, expert_routing_log=__file__)
    with pytest.raises(ConfigError, match="expert_routing_log: no such file"):
        PoolConfig("d", "decode", 2, experts=2, expert_routing_log=str(tmp_path / "missing.npz"))
    ckpt = tiny_checkpoint("qwen2_moe")  # 4 experts, top-2, MoE layers (0, 1)
    for bad, match in ((planted_log(num_experts=8), "logs 8 experts"), (planted_log(layers=(0,)), "logs layers")):
        path = os.path.join(tmp_path, f"bad{bad.num_experts}{len(bad.layers)}.npz")
        bad.save(path)
        cfg = ServeConfig(model=ckpt, pools=(PoolConfig("ep", "mixed", 2, experts=2, expert_routing_log=path),))
        with pytest.raises(ConfigError, match=rf"pools\[0\]\.expert_routing_log: .*{match}"):
            build_expert_affinities(cfg)
    good = str(tmp_path / "good.npz")
    planted_log().save(good)
    cfg = ServeConfig(model=ckpt, pools=(PoolConfig("ep", "mixed", 2, experts=2, expert_routing_log=good),))
    (aff,) = build_expert_affinities(cfg)
    assert aff.pool == "ep" and aff.rank_of("ep-1") == 1 and aff.rank_of("ep-2") is None
