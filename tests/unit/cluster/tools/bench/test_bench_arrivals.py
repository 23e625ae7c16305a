"""Arrival processes: Poisson rate, gamma burstiness (CV of the gaps), bounds, sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cluster.tools.bench.arrivals import LoadConfig, arrival_times, gaps, parse_rate, parse_rates, schedule

N = 50_000  # gaps per statistical check: the sample mean and CV land within ~2% (3 sigma)


def test_poisson_rate_and_exponential_gaps():
    g = gaps(N, 5.0, 1.0, np.random.default_rng(0))
    assert g.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV 1
    # exponential: P(gap < mean) = 1 - 1/e
    assert (g < 0.2).mean() == pytest.approx(1 - math.exp(-1), abs=0.01)
    # counting view: arrivals in [0, T) is about rate * T
    t = arrival_times(N, 5.0, 1.0, np.random.default_rng(1))
    assert (t < 2000.0).sum() == pytest.approx(5.0 * 2000.0, rel=0.03)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(burstiness):
    g = gaps(N, 8.0, burstiness, np.random.default_rng(42))
    assert g.mean() == pytest.approx(1 / 8.0, rel=0.05)  # the rate does not depend on burstiness
    cv = g.std() / g.mean()
    assert cv == pytest.approx(LoadConfig(burstiness=burstiness).gap_cv, rel=0.05)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_burstier_means_more_variable():
    cvs = [np.std(g) / np.mean(g) for g in (gaps(N, 1.0, b, np.random.default_rng(3)) for b in (0.3, 1.0, 3.0))]
    assert cvs[0] > cvs[1] > cvs[2]


def test_arrival_times_start_at_zero_and_never_go_back():
    t = arrival_times(100, 3.0, 0.5, np.random.default_rng(0))
    assert t.shape == (100,) and t[0] == 0.0 and (np.diff(t) >= 0).all()
    assert (arrival_times(7, math.inf, 1.0, np.random.default_rng(0)) == 0).all()
    assert len(arrival_times(1, 3.0, 1.0, np.random.default_rng(0))) == 1


def test_same_seed_same_schedule():
    a = arrival_times(50, 2.0, 0.7, np.random.default_rng(9))
    b = arrival_times(50, 2.0, 0.7, np.random.default_rng(9))
    c = arrival_times(50, 2.0, 0.7, np.random.default_rng(10))
    assert (a == b).all() and not (a == c).all()


def test_schedule_bounds_count_and_duration():
    cfg = LoadConfig(request_rate=10.0, num_requests=30)
    assert len(schedule(100, cfg, np.random.default_rng(0))) == 30
    assert len(schedule(12, cfg, np.random.default_rng(0))) == 12  # fewer requests than the bound
    bounded = LoadConfig(request_rate=10.0, num_requests=1000, duration_s=5.0)
    offsets = schedule(1000, bounded, np.random.default_rng(0))
    full = arrival_times(1000, 10.0, 1.0, np.random.default_rng(0))
    assert (offsets < 5.0).all() and len(offsets) == (full < 5.0).sum()
    assert len(offsets) == pytest.approx(50, abs=25)


def test_schedule_replays_trace_offsets_scaled():
    cfg = LoadConfig(num_requests=3, trace_speedup=2.0)
    out = schedule(5, cfg, np.random.default_rng(0), trace_offsets=[10.0, 11.0, 15.0, 16.0, 20.0])
    assert out.tolist() == [0.0, 0.5, 2.5]
    cut = LoadConfig(num_requests=10, duration_s=2.0)
    assert schedule(5, cut, np.random.default_rng(0), trace_offsets=[0.0, 1.0, 1.5, 2.0, 3.0]).tolist() == [0, 1, 1.5]
    with pytest.raises(ValueError, match="non-decreasing"):
        schedule(3, cfg, np.random.default_rng(0), trace_offsets=[0.0, 2.0, 1.0])


@pytest.mark.parametrize(
    "kw",
    [
        {"request_rate": 0.0},
        {"request_rate": -1.0},
        {"request_rate": math.nan},
        {"burstiness": 0.0},
        {"burstiness": math.inf},
        {"num_requests": 0},
        {"duration_s": 0.0},
        {"max_concurrency": 0},
        {"warmup": -1},
        {"trace_speedup": 0.0},
    ],
)
def test_load_config_rejects(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LoadConfig(**kw)


def test_rates_and_sweeps():
    assert parse_rate("2.5") == 2.5 and math.isinf(parse_rate("inf"))
    assert parse_rates("1, 2,4,inf") == [1.0, 2.0, 4.0, math.inf]
    for bad in ("0", "-3", "nan", "x"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    for bad in ("", ",", "1,1", "1,0"):
        with pytest.raises(ValueError):
            parse_rates(bad)
