"""The prefill:decode planner and the simulator's speed on thousands of instances."""

from __future__ import annotations

import time

import pytest

from cluster.tools.sim.model import ProfileTable, StepTimeModel
from cluster.tools.sim.planner import sweep_ratio
from cluster.tools.sim.roofline import EXAMPLE_PATH
from cluster.tools.sim.simulator import SimConfig, Simulator
from cluster.tools.sim.workload import load_trace, poisson


@pytest.fixture(scope="module")
def a100():
    return StepTimeModel(ProfileTable.load(EXAMPLE_PATH))


def test_small_plan_finds_the_balanced_split(a100):
    conv = load_trace("conversation")
    plan = sweep_ratio(a100, 12, 40.0, conv, slo_ttft_s=1.0, slo_tpot_s=0.05, duration_s=20, grid=4)
    b = plan.best
    assert b.num_prefill + b.num_decode == 12 and 1 <= b.num_prefill <= 11
    assert plan.full is None and plan.slice_instances == 12  # small enough: no slice
    assert b.attainment == max(c.attainment for c in plan.candidates)
    # the extremes are worse: all-but-one prefill starves decode and vice versa
    by_p = {c.num_prefill: c for c in plan.candidates}
    assert by_p[1].attainment < b.attainment or by_p[1].headroom > b.headroom
    assert b.attainment >= 0.9
    # code prompts are ~2x longer and outputs ~8x shorter: it wants more prefill instances
    code = sweep_ratio(a100, 12, 40.0, load_trace("code"), slo_ttft_s=1.0, slo_tpot_s=0.05, duration_s=20, grid=4)
    assert code.best.num_prefill > b.num_prefill


def test_plan_for_thousands_of_instances_is_fast(a100):
    t0 = time.perf_counter()
    plan = sweep_ratio(
        a100,
        2000,
        3000.0,
        load_trace("conversation"),
        slo_ttft_s=1.0,
        slo_tpot_s=0.05,
        duration_s=10,
        verify_requests=5000,
    )
    wall = time.perf_counter() - t0
    b = plan.best
    assert b.num_prefill + b.num_decode == 2000 and plan.full is b
    assert plan.slice_instances < 100 and plan.simulations <= 20
    assert b.attainment >= 0.9
    assert 0.05 < b.num_prefill / 2000 < 0.5  # conversation is decode-heavy
    assert wall < 120, f"planning took {wall:.1f} s"  # ~10 s on an idle 2-core box


def test_simulates_thousands_of_instances(a100):
    w = poisson(load_trace("conversation"), 1500.0, num_requests=15000, seed=0)
    r = Simulator(a100, SimConfig(num_prefill=300, num_decode=700)).run(w)
    s = r.summary()
    assert s["finished"] == 15000 and len(r.instances) == 1000
    assert r.wall_s < 90, f"{r.wall_s:.1f} s"  # ~2-3 s on an idle 2-core box
