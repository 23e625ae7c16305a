"""RoutingPolicy on fabricated load snapshots: policies, ties, health, short prompts, role switching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import ROUTING_POLICIES, RouterConfig
from cluster.control.routing import NoWorkerAvailable, RouteReason, RoutingPolicy, WorkerLoad, WorkersBusy

LONG = 1000  # prompt length above every short_prompt_threshold used here


def P(wid: str, **kw) -> WorkerLoad:
    return WorkerLoad(wid, "prefill", **{"total_kv_blocks": 100, "free_kv_blocks": 100, **kw})


def D(wid: str, **kw) -> WorkerLoad:
    return WorkerLoad(wid, "decode", **{"total_kv_blocks": 100, "free_kv_blocks": 100, **kw})


def policy(**kw) -> RoutingPolicy:
    return RoutingPolicy(RouterConfig(**{"short_prompt_threshold": 16, **kw}))


# ------------------------------------------------------------------ within-pool policies

# Three decode workers where each load-aware policy prefers a different one.
DECODERS = [
    D("d0", pending_requests=1, pending_prompt_tokens=900, free_kv_blocks=10, cached_prefix_hashes=frozenset()),
    D("d1", pending_requests=5, pending_prompt_tokens=100, free_kv_blocks=20, cached_prefix_hashes=frozenset({7})),
    D("d2", pending_requests=3, pending_prompt_tokens=500, free_kv_blocks=90, cached_prefix_hashes=frozenset({7, 8})),
]


@pytest.mark.parametrize("name, expected", [("jsq", "d0"), ("token_jsq", "d1"), ("kv", "d2"), ("prefix", "d2")])
def test_each_policy_picks_its_least_loaded_worker(name, expected):
    r = policy(decode_policy=name)
    d = r.route(4, DECODERS, prefix_hashes=(7, 8, 9))
    assert d.decode_worker == expected
    assert d.prefill_worker is None and d.reason is RouteReason.SHORT_PROMPT


def test_prefix_counts_only_the_leading_match_and_falls_back_to_tokens():
    loads = [
        D("d0", pending_prompt_tokens=50, cached_prefix_hashes=frozenset({2, 3})),  # no leading match
        D("d1", pending_prompt_tokens=40),
    ]
    assert policy(decode_policy="prefix").route(4, loads, prefix_hashes=(1, 2, 3)).decode_worker == "d1"


def test_custom_prefix_score_hook_is_used():
    calls = []

    def score(load, hashes):
        calls.append((load.worker_id, tuple(hashes)))
        return 1 if load.worker_id == "d1" else 0

    r = RoutingPolicy(RouterConfig(short_prompt_threshold=16, decode_policy="prefix"), prefix_score=score)
    assert r.route(4, [D("d0"), D("d1")], prefix_hashes=(5,)).decode_worker == "d1"
    assert sorted(calls) == [("d0", (5,)), ("d1", (5,))]


def test_kv_ties_on_free_blocks_break_by_fewest_running():
    loads = [D("d0", free_kv_blocks=50, running_requests=4), D("d1", free_kv_blocks=50, running_requests=2)]
    assert policy(decode_policy="kv").route(4, loads).decode_worker == "d1"


@pytest.mark.parametrize("name", ["jsq", "token_jsq", "kv", "prefix"])
def test_full_ties_go_to_lowest_id_in_natural_order(name):
    loads = [D("d10"), D("d2"), D("d3")]
    assert policy(decode_policy=name).route(4, loads).decode_worker == "d2"


def test_round_robin_cycles_in_id_order_and_survives_membership_changes():
    r = policy(decode_policy="round_robin")
    loads = [D("d2"), D("d0"), D("d1")]
    assert [r.route(4, loads).decode_worker for _ in range(4)] == ["d0", "d1", "d2", "d0"]
    # d1 goes unhealthy: skipped, and the cursor continues after d0
    loads = [D("d0"), D("d1", healthy=False), D("d2")]
    assert [r.route(4, loads).decode_worker for _ in range(3)] == ["d2", "d0", "d2"]


def test_prefill_and_decode_round_robin_cursors_are_independent():
    r = policy(prefill_policy="round_robin", decode_policy="round_robin")
    loads = [P("p0"), P("p1"), D("d0"), D("d1")]
    assert r.route(4, loads).decode_worker == "d0"  # a short prompt advances only the decode cursor
    got = [(d.prefill_worker, d.decode_worker) for d in (r.route(LONG, loads) for _ in range(3))]
    assert got == [("p0", "d1"), ("p1", "d0"), ("p0", "d1")]


@pytest.mark.parametrize("name", ROUTING_POLICIES)
def test_unhealthy_workers_are_never_chosen(name):
    r = policy(prefill_policy=name, decode_policy=name)
    loads = [
        P("p0", healthy=False),
        P("p1", pending_requests=9, pending_prompt_tokens=900),
        D("d0", healthy=False, free_kv_blocks=100, cached_prefix_hashes=frozenset({1})),
        D("d1", free_kv_blocks=1, pending_requests=9, pending_prompt_tokens=900),
    ]
    for _ in range(3):
        d = r.route(LONG, loads, prefix_hashes=(1,))
        assert (d.prefill_worker, d.decode_worker, d.reason) == ("p1", "d1", RouteReason.SPLIT)


# ------------------------------------------------------------------ request paths


def test_short_prompt_boundary():
    r = policy(short_prompt_threshold=16)
    loads = [P("p0"), D("d0")]
    assert r.route(15, loads).prefill_worker is None
    at = r.route(16, loads)
    assert (at.prefill_worker, at.decode_worker, at.reason) == ("p0", "d0", RouteReason.SPLIT)
    # threshold 0 disables the short path even for empty prompts
    assert policy(short_prompt_threshold=0).route(0, loads).reason is RouteReason.SPLIT


def test_split_route_uses_both_policies():
    loads = [P("p0", pending_prompt_tokens=300), P("p1", pending_prompt_tokens=200), D("d0", free_kv_blocks=5), D("d1")]
    d = policy(prefill_policy="token_jsq", decode_policy="kv").route(LONG, loads)
    assert (d.prefill_worker, d.decode_worker) == ("p1", "d1")


def test_no_healthy_decode_worker_raises_with_clear_message():
    r = policy()
    with pytest.raises(NoWorkerAvailable, match=r"no healthy decode-capable.*unhealthy: \['d0', 'd1'\]"):
        r.route(LONG, [P("p0"), D("d0", healthy=False), D("d1", healthy=False)])
    with pytest.raises(NoWorkerAvailable, match="decode-capable"):
        r.route(4, [P("p0")])
    with pytest.raises(NoWorkerAvailable):
        r.route(4, [])


def test_no_prefill_worker_falls_back_to_local_prefill_or_raises():
    loads = [P("p0", healthy=False), D("d0")]
    d = policy().route(LONG, loads)
    assert (d.prefill_worker, d.decode_worker, d.reason) == (None, "d0", RouteReason.NO_PREFILL_WORKER)
    with pytest.raises(NoWorkerAvailable, match="prefill-capable"):
        policy(fallback_local_prefill=False).route(LONG, loads)


def test_configured_mixed_pool_serves_whole_requests_and_decodes_for_others():
    loads = [P("p0", pending_prompt_tokens=500), WorkerLoad("m0", "mixed", total_kv_blocks=10, free_kv_blocks=10)]
    r = policy(decode_policy="kv")
    d = r.route(LONG, loads)
    assert (d.prefill_worker, d.decode_worker, d.reason) == (None, "m0", RouteReason.MIXED)
    assert r.roles() == {"p0": "prefill", "m0": "mixed"}


def test_bad_inputs_are_loud():
    with pytest.raises(ValueError, match="role must be one of"):
        WorkerLoad("x", "attention")
    with pytest.raises(ValueError, match="pending_requests must be >= 0"):
        WorkerLoad("x", "decode", pending_requests=-1)
    with pytest.raises(ValueError, match="free_kv_blocks 5 > total 4"):
        WorkerLoad("x", "decode", free_kv_blocks=5, total_kv_blocks=4)
    with pytest.raises(ValueError, match="duplicate worker ids"):
        policy().route(LONG, [D("d0"), D("d0")])
    with pytest.raises(ValueError, match="prompt_len"):
        policy().route(-1, [D("d0")])


# ------------------------------------------------------------------ role switching

SWITCH = dict(
    prefill_saturation_tokens=1000, prefill_release_tokens=200, mixed_max_running=4, mixed_min_free_kv_fraction=0.5
)


def snapshot(prefill_tokens: int, **d1) -> list[WorkerLoad]:
    return [
        P("p0", pending_prompt_tokens=prefill_tokens),
        P("p1", pending_prompt_tokens=prefill_tokens + 50),
        D("d0", running_requests=6),  # too busy to be promoted
        D("d1", **{"running_requests": 1, **d1}),
    ]


def test_saturation_promotes_an_idle_decode_worker_which_takes_whole_requests():
    r = policy(**SWITCH)
    assert r.route(LONG, snapshot(1000)).reason is RouteReason.SPLIT  # == threshold is not "exceeds"
    assert r.drain_events() == []
    d = r.route(LONG, snapshot(1001))
    assert (d.prefill_worker, d.decode_worker, d.reason) == (None, "d1", RouteReason.MIXED)
    assert r.roles() == {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "mixed"}
    [ev] = r.drain_events()
    assert (ev.seq, ev.worker_id, ev.old_role, ev.new_role, ev.reason) == (
        0,
        "d1",
        "decode",
        "mixed",
        "prefill_saturated",
    )
    assert r.drain_events() == []


@pytest.mark.parametrize("d1", [dict(running_requests=4), dict(free_kv_blocks=49), dict(healthy=False)])
def test_busy_full_or_unhealthy_decode_workers_are_not_promoted(d1):
    r = policy(**SWITCH)
    assert r.observe(snapshot(5000, **d1)) == []
    assert r.promoted() == frozenset()


def test_hysteresis_no_flapping_then_demotion_when_pressure_ends():
    r = policy(**SWITCH)
    r.observe(snapshot(2000))
    assert r.promoted() == {"d1"}
    # pressure wanders inside [release, saturation] and across the saturation line: no changes
    for tokens in (999, 1000, 1001, 500, 200, 1500, 200):
        assert r.observe(snapshot(tokens)) == []
        assert r.roles()["d1"] == "mixed"
    [ev] = r.observe(snapshot(199))
    assert (ev.worker_id, ev.old_role, ev.new_role, ev.reason) == ("d1", "mixed", "decode", "pressure_ended")
    assert r.roles()["d1"] == "decode"
    # back inside the band: stays demoted
    for tokens in (200, 999, 1000):
        assert r.observe(snapshot(tokens)) == []
    assert r.route(LONG, snapshot(500)).reason is RouteReason.SPLIT
    assert [e.seq for e in r.drain_events()] == [0, 1]


def test_a_promoted_worker_reconfigured_as_mixed_leaves_the_promoted_set():
    """Found by the property test below: the reconfiguration was recorded as a promotion."""
    r = policy(**SWITCH)
    r.observe(snapshot(2000))
    assert r.promoted() == {"d1"}
    [ev] = r.observe([P("p0"), WorkerLoad("d1", "mixed", total_kv_blocks=100, free_kv_blocks=100)])
    assert (ev.worker_id, ev.old_role, ev.new_role, ev.reason) == ("d1", "mixed", "mixed", "reconfigured")
    assert r.promoted() == frozenset() and r.roles()["d1"] == "mixed"


def test_workers_at_their_bound_are_skipped_and_all_busy_is_workers_busy():
    r = policy()
    assert r.route(LONG, [P("p0"), D("d0", accepting=False), D("d1")]).decode_worker == "d1"
    with pytest.raises(WorkersBusy, match=r"decode-capable worker is at its in-flight bound: \['d0'\]"):
        r.route(4, [D("d0", accepting=False), D("d1", healthy=False)])
    # a busy prefill pool refuses: it is no reason to prefill on the decode worker
    with pytest.raises(WorkersBusy, match="prefill-capable"):
        r.route(LONG, [P("p0", accepting=False), D("d0")])
    assert r.route(LONG, [P("p0", healthy=False), D("d0")]).reason is RouteReason.NO_PREFILL_WORKER


def test_pressure_is_the_least_loaded_prefill_worker():
    r = policy(**SWITCH)
    loads = [P("p0", pending_prompt_tokens=5000), P("p1", pending_prompt_tokens=10), D("d0")]
    assert r.observe(loads) == []  # p1 still has room: not saturated
    loads[1] = P("p1", healthy=False)  # unhealthy prefill workers do not count
    assert [e.worker_id for e in r.observe(loads)] == ["d0"]


def test_promotion_is_one_per_call_up_to_the_cap_idlest_first():
    r = policy(**{**SWITCH, "max_mixed_workers": 2})
    loads = [P("p0", pending_prompt_tokens=5000), D("d0", running_requests=2), D("d1", running_requests=1), D("d2")]
    assert [e.worker_id for e in r.observe(loads)] == ["d2"]
    assert [e.worker_id for e in r.observe(loads)] == ["d1"]
    assert r.observe(loads) == []
    assert r.promoted() == {"d1", "d2"}
    assert policy(**{**SWITCH, "max_mixed_workers": 0}).observe(loads) == []


def test_promoted_worker_unhealthy_or_removed_or_reconfigured_is_demoted_at_once():
    r = policy(**SWITCH)
    r.observe(snapshot(2000))
    [ev] = r.observe(snapshot(2000, healthy=False))
    assert (ev.worker_id, ev.reason, ev.new_role) == ("d1", "unhealthy", "decode")
    r.observe(snapshot(2000))  # healthy again and still saturated: promoted again
    assert r.promoted() == {"d1"}
    [ev] = r.observe(snapshot(2000)[:3])
    assert (ev.worker_id, ev.reason) == ("d1", "removed")
    assert "d1" not in r.roles()
    r.observe(snapshot(2000))
    [ev] = r.observe(snapshot(2000)[:3] + [P("d1", pending_prompt_tokens=2000)])
    assert (ev.worker_id, ev.reason, ev.new_role) == ("d1", "reconfigured", "prefill")
    assert r.roles()["d1"] == "prefill"


# ------------------------------------------------------------------ properties

load_st = st.builds(
    lambda wid, role, healthy, pend, toks, run, total, used: WorkerLoad(
        f"w{wid}", role, healthy, pend, toks, run, total - min(used, total), total
    ),
    st.integers(0, 7),
    st.sampled_from(["prefill", "decode", "mixed"]),
    st.booleans(),
    st.integers(0, 20),
    st.integers(0, 3000),
    st.integers(0, 12),
    st.integers(0, 64),
    st.integers(0, 64),
)
snapshots_st = st.lists(st.lists(load_st, max_size=6, unique_by=lambda w: w.worker_id), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    snaps=snapshots_st,
    prefill_policy=st.sampled_from(ROUTING_POLICIES),
    decode_policy=st.sampled_from(ROUTING_POLICIES),
    prompt_len=st.integers(0, 64),
)
def test_decisions_respect_invariants_and_are_deterministic(snaps, prefill_policy, decode_policy, prompt_len):
    cfg = RouterConfig(
        prefill_policy=prefill_policy,
        decode_policy=decode_policy,
        short_prompt_threshold=16,
        prefill_saturation_tokens=1500,
        prefill_release_tokens=500,
        mixed_max_running=6,
        mixed_min_free_kv_fraction=0.3,
        max_mixed_workers=2,
    )

    def run() -> list:
        r, out = RoutingPolicy(cfg), []
        for loads in snaps:
            try:
                d = r.route(prompt_len, loads, prefix_hashes=(1, 2))
            except NoWorkerAvailable:
                assert not any(w.healthy and r.roles()[w.worker_id] in ("decode", "mixed") for w in loads)
                out.append(None)
                continue
            healthy = {w.worker_id: w for w in loads if w.healthy}
            roles = r.roles()
            assert d.decode_worker in healthy and roles[d.decode_worker] in ("decode", "mixed")
            if d.prefill_worker is not None:
                assert d.prefill_worker in healthy and roles[d.prefill_worker] == "prefill"
            assert len(r.promoted()) <= cfg.max_mixed_workers
            assert all(healthy.get(w) is not None and healthy[w].role == "decode" for w in r.promoted())
            out.append(d)
        return out + r.drain_events()

    assert run() == run()
