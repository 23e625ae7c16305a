"""The discrete-event simulator: analytic cases, memory limits, conservation, determinism,
role switching and routing on reduced snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import RouterConfig
from cluster.tools.sim.simulator import LinkConfig, SimConfig, Simulator
from cluster.tools.sim.workload import Workload, fixed, load_trace, poisson
from tests.unit.cluster.tools.sim.helpers import flat_table, linear_table, model

SPLIT_ALWAYS = RouterConfig(short_prompt_threshold=0, max_mixed_workers=0)
BW = LinkConfig(bandwidth_gbps=8.0, latency_s=0.0)  # 1e9 bytes/s


def one(prompt: int, output: int, at: float = 0.0) -> Workload:
    return Workload("one", (at,), (prompt,), (output,))


def run(table, workload, **cfg):
    cfg.setdefault("router", SPLIT_ALWAYS)
    cfg.setdefault("link", BW)
    return Simulator(model(table), SimConfig(**cfg)).run(workload)


def check_conservation(result) -> None:
    """Every request finished once with all its tokens; every block came back."""
    reqs = result.requests
    assert all(r.t_done >= 0 and r.generated == r.output for r in reqs)
    assert all(r.t_first <= r.t_done for r in reqs)
    # each output token after the first is one ITL sample (weights count tokens)
    assert sum(result.itl_w) == pytest.approx(sum(r.output - 1 for r in reqs))
    for m in result.instances:
        assert m.free_kv_blocks == m.total_kv_blocks, m.worker_id
        assert m.held_blocks == 0 and m.pending_requests == 0 and m.pending_prompt_tokens == 0
        assert not m.order and not m.waiting and not m.reserve_q and m.n_dec == 0 and m.ctx_sum == 0


# ---------------------------------------------------------------------------- analytic


@pytest.mark.parametrize("layerwise", [True, False])
def test_one_request_split(layerwise):
    t = flat_table(prefill_s=0.1, decode_s=0.01, num_layers=4, kv_bytes_per_token=1000)
    link = LinkConfig(bandwidth_gbps=8.0, latency_s=0.002, layerwise=layerwise)
    r = run(t, one(prompt=100, output=5), link=link)
    q = r.requests[0]
    full = 100 * 1000 / 1e9  # the whole KV over the link
    tail = full / 4  # layer-wise: only the last layer is left when the prefill ends
    handover = (tail if layerwise else full) + 0.002
    assert q.reason == "split" and q.prefill_inst != q.decode_inst
    assert q.t_first == pytest.approx(0.1)  # TTFT = prefill step: the first token comes from the prefill
    assert q.transfer_s == pytest.approx(handover)
    assert q.t_second == pytest.approx(0.1 + handover + 0.01)  # + KV hand-over + one decode step
    assert q.t_done == pytest.approx(0.1 + handover + 4 * 0.01)
    s = r.summary()
    assert s["ttft_s"]["p50"] == pytest.approx(0.1)
    assert s["tpot_s"]["p50"] == pytest.approx(0.01 + handover / 4)
    assert s["kv_handover_s"]["p50"] == pytest.approx(handover)
    check_conservation(r)


def test_local_paths_and_dispatch_delay():
    t = flat_table(prefill_s=0.1, decode_s=0.01)
    # a prompt under the short-prompt threshold is prefilled on the decode instance: no transfer
    r = run(t, one(prompt=10, output=3, at=1.0), router=RouterConfig(short_prompt_threshold=32), dispatch_s=0.005)
    q = r.requests[0]
    assert q.reason == "short_prompt" and q.prefill_inst == q.decode_inst
    assert r.summary()["ttft_s"]["p50"] == pytest.approx(0.005 + 0.1)
    assert q.t_done - q.t_first == pytest.approx(2 * 0.01)
    # a mixed pool runs both phases; the first decode step waits for the prefill step only
    r = run(t, one(prompt=100, output=3), num_prefill=0, num_decode=0, num_mixed=1)
    assert r.requests[0].reason == "mixed" and r.requests[0].t_done == pytest.approx(0.1 + 0.02)


def test_chunked_prefill_takes_one_step_per_chunk():
    t = flat_table(prefill_s=0.1, decode_s=0.01, budget=256)
    r = run(t, one(prompt=1000, output=2))
    assert r.requests[0].t_first == pytest.approx(4 * 0.1)  # 256 + 256 + 256 + 232 tokens
    assert r.instances[0].num_steps == 4


def test_one_token_request_ends_at_its_prefill_and_frees_the_reservation():
    r = run(flat_table(), one(prompt=100, output=1))
    q = r.requests[0]
    assert q.t_done == q.t_first == pytest.approx(0.1)
    check_conservation(r)


def test_requests_batch_in_steps():
    t = flat_table(prefill_s=0.1, decode_s=0.01)
    r = run(t, fixed(3, prompt_len=64, output_len=11))
    a, b, c = r.requests
    # the first arrival starts a step at once; the next two wait for it and share the next one
    assert (a.t_first, b.t_first, c.t_first) == pytest.approx((0.1, 0.2, 0.2))
    assert r.instances[0].num_steps == 2
    # a decodes alone for a while, then b and c join its batch at a step boundary: the flat
    # table makes a step cost the same for any batch, so a is not slowed down
    assert a.t_done == pytest.approx(0.1 + a.transfer_s + 10 * 0.01)
    for q in (b, c):  # 10 decode steps after joining at one of a's step boundaries
        assert q.t_done == pytest.approx(q.t_second + 9 * 0.01)
        boundary = (q.t_second - a.t_second) / 0.01
        assert boundary == pytest.approx(round(boundary))


# ---------------------------------------------------------------------------- memory


def test_requests_wait_when_memory_is_full():
    # 64-token prompts (4 blocks) growing to 64 + 32 tokens of KV (6 blocks): 6 blocks hold one
    t = flat_table(prefill_s=0.1, decode_s=0.01, num_blocks=6)
    r = run(t, fixed(2, prompt_len=64, output_len=33))
    a, b = r.requests
    assert r.num_preemptions == 0
    # the second prompt waits on the prefill instance for the first one's KV to leave ...
    assert b.t_first == pytest.approx(a.t_first + a.transfer_s + 0.1)
    # ... and its KV reservation on the decode instance for the first request to finish
    assert b.t_reserved == pytest.approx(a.t_done)
    assert b.t_second > a.t_done
    check_conservation(r)
    # with room for both they overlap
    r2 = run(flat_table(prefill_s=0.1, decode_s=0.01, num_blocks=100), fixed(2, prompt_len=64, output_len=33))
    assert r2.requests[1].t_done < b.t_done - 0.1


def test_growth_without_room_preempts_and_recomputes():
    # both KVs fit at admission (4 + 4 of 9 blocks) but not as they grow to 7 blocks each
    t = flat_table(prefill_s=0.1, decode_s=0.01, num_blocks=9)
    r = run(t, fixed(2, prompt_len=64, output_len=41))
    assert r.num_preemptions >= 1
    assert max(q.preemptions for q in r.requests) >= 1
    check_conservation(r)


def test_a_request_that_cannot_fit_is_an_error():
    with pytest.raises(ValueError, match="needs 1099 tokens of KV"):
        run(flat_table(num_blocks=10), one(prompt=1000, output=100))


def test_horizon_leaves_requests_unfinished():
    r = run(flat_table(decode_s=0.01), fixed(5, 100, 100, rate=1.0), horizon_s=3.0)
    s = r.summary()
    assert 0 < s["finished"] < 5 and s["unfinished"] == 5 - s["finished"]
    assert r.end_s <= 3.0


# ---------------------------------------------------------------------------- properties


def _busy_workload(n: int = 600, rate: float = 40.0, seed: int = 1) -> Workload:
    return poisson(load_trace("conversation"), rate, num_requests=n, seed=seed).clipped(1500, 300)


def test_deterministic_for_a_seed():
    w = _busy_workload()
    cfg = dict(num_prefill=2, num_decode=2, num_mixed=1, router=RouterConfig(), num_blocks=400)
    a = run(linear_table(), w, **cfg).arrays()
    b = run(linear_table(), w, **cfg).arrays()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    j1 = run(linear_table(), w, step_jitter=0.2, seed=7, **cfg).arrays()
    j2 = run(linear_table(), w, step_jitter=0.2, seed=7, **cfg).arrays()
    j3 = run(linear_table(), w, step_jitter=0.2, seed=8, **cfg).arrays()
    np.testing.assert_array_equal(j1["e2e"], j2["e2e"])
    assert not np.array_equal(j1["e2e"], j3["e2e"])


@pytest.mark.parametrize("num_blocks", [None, 300])  # 300: memory pressure, preemptions
def test_conservation_under_load(num_blocks):
    r = run(
        linear_table(),
        _busy_workload(),
        num_prefill=2,
        num_decode=3,
        num_mixed=1,
        router=RouterConfig(short_prompt_threshold=64),
        num_blocks=num_blocks,
    )
    check_conservation(r)
    assert len({q.reason for q in r.requests}) >= 2
    if num_blocks:
        assert r.num_preemptions > 0


def test_macro_steps_are_exact():
    # kv-free policies: with macro-steps the snapshots' free_kv_blocks runs ahead (documented)
    router = RouterConfig(prefill_policy="jsq", decode_policy="jsq", max_mixed_workers=0)
    for num_blocks in (None, 300):
        res = [
            run(
                linear_table(),
                _busy_workload(),
                num_prefill=2,
                num_decode=2,
                router=router,
                num_blocks=num_blocks,
                macro_max_steps=k,
            )
            for k in (1, 128)
        ]
        a, b = (x.arrays() for x in res)
        for key in ("ttft", "tpot", "e2e"):
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-9)
        assert res[1].num_events < res[0].num_events  # and cheaper
        assert res[0].num_preemptions == res[1].num_preemptions


POLICIES = ["round_robin", "jsq", "token_jsq", "kv", "prefix"]


@pytest.mark.parametrize("prefill_policy, decode_policy", list(zip(POLICIES, reversed(POLICIES))))
def test_reduced_snapshots_route_like_full_ones(prefill_policy, decode_policy):
    router = RouterConfig(
        prefill_policy=prefill_policy,
        decode_policy=decode_policy,
        prefill_saturation_tokens=3000,
        prefill_release_tokens=500,
        max_mixed_workers=2,
        mixed_max_running=16,
    )
    # check_routing asserts every decision and role switch equals the full-snapshot policy's
    r = run(
        linear_table(),
        _busy_workload(800, rate=60),
        num_prefill=3,
        num_decode=5,
        num_mixed=1,
        router=router,
        check_routing=True,
    )
    check_conservation(r)


def test_role_switching_under_prefill_saturation():
    router = RouterConfig(prefill_saturation_tokens=4000, prefill_release_tokens=1000, max_mixed_workers=1)
    w = fixed(200, prompt_len=1000, output_len=20, rate=60.0)  # more prompt tokens than one prefill instance computes
    r = run(linear_table(), w, num_prefill=1, num_decode=3, router=router, check_routing=True)
    reasons = [e.reason for e in r.role_switches]
    assert "prefill_saturated" in reasons
    assert r.summary()["routes"].get("mixed", 0) > 0  # the promoted decode instance takes whole requests
    check_conservation(r)
    # the same load with switching off never routes "mixed" and has a worse TTFT tail
    off = run(linear_table(), w, num_prefill=1, num_decode=3, router=RouterConfig(max_mixed_workers=0))
    assert not off.role_switches and "mixed" not in off.summary()["routes"]
    assert off.summary()["ttft_s"]["p90"] > r.summary()["ttft_s"]["p90"]


def test_summary_and_goodput():
    r = run(flat_table(prefill_s=0.1, decode_s=0.01), fixed(4, 100, 11, rate=1.0))
    s = r.summary(slo_ttft_s=0.2, slo_tpot_s=0.05)
    assert s["finished"] == 4 and s["slo"]["attainment"] == 1.0
    assert s["slo"]["goodput_rps"] == pytest.approx(4 / 3.0)  # arrivals at 0, 1, 2, 3 s
    assert s["output_tokens_per_s"] == pytest.approx(44 / s["span_s"])
    strict = r.summary(slo_ttft_s=0.05)
    assert strict["slo"]["attainment"] == 0.0
