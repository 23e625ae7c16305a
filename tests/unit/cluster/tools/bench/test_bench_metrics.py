"""Metric definitions against hand-computed examples: TTFT, TPOT, ITL, E2E, percentiles, goodput."""

from __future__ import annotations

import pytest

from cluster.tools.bench.metrics import (
    RequestRecord,
    count_good,
    latency_stats,
    meets_slos,
    parse_goodput,
    peak_concurrency,
    peak_output_rate,
    percentile_key,
    summarize,
)


def rec(start, chunks, end=None, output_len=None, prompt_len=10, success=True, error=""):
    r = RequestRecord(prompt_len=prompt_len, expected_output=output_len or 0, start=start)
    for t, k in chunks:
        r.add_chunk(t, k)
    r.end = end if end is not None else (chunks[-1][0] if chunks else start)
    r.output_len = output_len if output_len is not None else sum(k for _, k in chunks)
    r.success, r.error = success, error
    return r


# sent at 10.0; chunks at 10.5 (1 token), 10.7 (1), 11.0 (2), 11.1 (1): 5 tokens
A = dict(start=10.0, chunks=[(10.5, 1), (10.7, 1), (11.0, 2), (11.1, 1)])


def test_single_request_definitions():
    r = rec(**A)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / (5 - 1))  # 0.15
    assert r.itls == pytest.approx([0.2, 0.3, 0.1])  # one gap per chunk: the 2-token chunk is one gap
    assert r.token_times == pytest.approx([10.5, 10.7, 11.0, 11.0, 11.1])


def test_no_tpot_for_one_token_and_no_ttft_without_tokens():
    one = rec(0.0, [(0.3, 1)])
    assert one.ttft == pytest.approx(0.3) and one.tpot is None and one.itls == []
    empty = rec(0.0, [(0.3, 0)], end=0.4)  # a message without tokens is not a chunk
    assert empty.chunks == [] and empty.ttft is None and empty.tpot is None


def test_latency_stats_percentiles_interpolate_linearly():
    s = latency_stats("ttft", [1.0, 2.0, 3.0, 4.0], (50, 90, 99, 99.9))
    assert s["mean_ttft_ms"] == pytest.approx(2500.0)
    assert s["median_ttft_ms"] == pytest.approx(2500.0) == s["p50_ttft_ms"]
    assert s["std_ttft_ms"] == pytest.approx(1000.0 * 1.25**0.5)  # population sd
    assert s["p90_ttft_ms"] == pytest.approx(3700.0)  # rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
    assert s["p99_ttft_ms"] == pytest.approx(3970.0)
    assert s["p99.9_ttft_ms"] == pytest.approx(3997.0)
    assert latency_stats("itl", [], (99,)) == {"mean_itl_ms": 0, "median_itl_ms": 0, "std_itl_ms": 0, "p99_itl_ms": 0}
    assert percentile_key(99, "tpot") == "p99_tpot_ms" and percentile_key(99.9, "e2el") == "p99.9_e2el_ms"


def test_summarize_hand_computed():
    a = rec(**A, prompt_len=10)  # ttft .5, tpot .15, e2e 1.1, 5 tokens
    b = rec(10.2, [(10.4, 1), (10.8, 1), (11.2, 1)], prompt_len=20)  # ttft .2, tpot .4, e2e 1.0
    c = rec(10.3, [(10.9, 1)], prompt_len=30)  # one token: ttft .6, no tpot, e2e .6
    bad = rec(10.1, [], end=10.2, prompt_len=40, output_len=0, success=False, error="Unavailable: x")
    s = summarize([a, b, c, bad], duration_s=2.0, percentiles=(50, 99))
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_input_tokens"] == 60 and s["total_output_tokens"] == 9  # failed requests count nothing
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5) and s["total_token_throughput"] == pytest.approx(34.5)
    assert s["mean_ttft_ms"] == pytest.approx((500 + 200 + 600) / 3)
    assert s["median_ttft_ms"] == pytest.approx(500)
    assert s["mean_tpot_ms"] == pytest.approx((150 + 400) / 2)  # c has one token: no TPOT
    assert s["mean_itl_ms"] == pytest.approx(1000 * (0.2 + 0.3 + 0.1 + 0.4 + 0.4) / 5)
    assert s["median_e2el_ms"] == pytest.approx(1000)
    assert s["request_goodput"] is None and s["good_requests"] is None  # no SLOs given
    assert s["input_lens"] == [10, 20, 30, 40] and s["output_lens"] == [5, 3, 1, 0]
    assert s["ttfts"] == pytest.approx([0.5, 0.2, 0.6, 0.0])
    assert s["errors"] == ["", "", "", "Unavailable: x"]
    assert s["max_concurrent_requests"] == 3  # bad ends at 10.2 as b starts: never all four
    assert s["percentiles"] == [50, 99]
    with pytest.raises(ValueError):
        summarize([a], duration_s=0.0)


def test_goodput_counts_requests_meeting_every_slo():
    a = rec(**A)  # ttft 500 ms, tpot 150 ms, e2el 1100 ms
    b = rec(10.2, [(10.4, 1), (10.8, 1), (11.2, 1)])  # ttft 200, tpot 400, e2el 1000
    c = rec(10.3, [(10.9, 1)])  # ttft 600, no tpot, e2el 600
    failed = rec(10.0, [(10.01, 1)], success=False)  # fast, but failed
    recs = [a, b, c, failed]
    assert count_good(recs, {"ttft": 550}) == 2  # a, b
    assert count_good(recs, {"tpot": 200}) == 2  # a, and c (no TPOT to violate)
    assert count_good(recs, {"ttft": 550, "tpot": 200}) == 1  # only a meets both
    assert count_good(recs, {"e2el": 1050}) == 2  # b, c
    assert count_good(recs, {"ttft": 1}) == 0
    assert not meets_slos(failed, {"ttft": 1e9})
    s = summarize(recs, 2.0, {"ttft": 550, "tpot": 200})
    assert s["good_requests"] == 1 and s["request_goodput"] == pytest.approx(0.5)


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {"ttft": 500, "tpot": 50, "e2el": 2000.5}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:0"], ["ttft:-5"], ["ttft:inf"], ["ttft:1", "ttft:2"]):
        with pytest.raises(ValueError, match="goodput SLO"):
            parse_goodput(bad)


def test_peaks():
    r1, r2, r3 = rec(0.0, [(0.5, 2)], end=2.0), rec(1.0, [(1.2, 3)], end=3.0), rec(2.5, [(3.9, 4)], end=4.0)
    assert peak_concurrency([r1, r2, r3]) == 2
    assert peak_concurrency([rec(0.0, [], end=1.0), rec(1.0, [], end=2.0)]) == 1  # ends before starts at a tie
    assert peak_output_rate([r1, r2, r3], t0=0.0) == 4.0  # buckets [0,1): 2, [1,2): 3, [3,4): 4
