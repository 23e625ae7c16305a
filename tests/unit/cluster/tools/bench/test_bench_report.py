"""Result files, plots, the summary table and the CLI paths that need no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.tools.bench.command import format_comparison, format_summary
from cluster.tools.bench.metrics import RequestRecord, summarize
from cluster.tools.bench.plots import (
    ResultFileError,
    compare_series,
    load_runs,
    offered_rate,
    plot_results,
    save_results,
)

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(rate, ttft_s: float, slos=None) -> dict:
    recs = []
    for i in range(4):
        r = RequestRecord(prompt_len=10, expected_output=3, start=float(i))
        r.add_chunk(i + ttft_s, 1)
        r.add_chunk(i + ttft_s + 0.01 * (i + 1), 2)
        r.end, r.output_len, r.success = i + ttft_s + 0.01 * (i + 1), 3, True
        recs.append(r)
    run = summarize(recs, duration_s=4.0, slos=slos)
    run.update(request_rate=rate, goodput_slos_ms=slos or {}, max_concurrency=None)
    return run


def test_save_and_load_round_trip(tmp_path: Path):
    one, sweep = tmp_path / "one.json", tmp_path / "sweep.json"
    save_results(one, [fake_run(1.0, 0.1)])
    save_results(sweep, [fake_run(1.0, 0.1), fake_run("inf", 0.3)])
    assert isinstance(json.loads(one.read_text()), dict) and len(json.loads(sweep.read_text())["runs"]) == 2
    assert load_runs(one)[0]["median_ttft_ms"] == pytest.approx(100.0)
    assert [r["request_rate"] for r in load_runs(sweep)] == [1.0, "inf"]


@pytest.mark.parametrize("body", ["{", "[]", '{"runs": []}', '{"completed": 1}', '{"runs": [1]}'])
def test_bad_result_files(tmp_path: Path, body):
    f = tmp_path / "r.json"
    f.write_text(body)
    with pytest.raises(ResultFileError):
        load_runs(f)
    with pytest.raises(ResultFileError, match="cannot read"):
        load_runs(tmp_path / "missing.json")


def test_offered_rate_of_an_inf_run_is_its_throughput():
    assert offered_rate(fake_run(2.5, 0.1)) == 2.5
    assert offered_rate(fake_run("inf", 0.1)) == pytest.approx(1.0)  # 4 requests in 4 s


def test_plots_are_pngs(tmp_path: Path):
    runs = [fake_run(r, 0.05 * r, {"ttft": 120}) for r in (1.0, 2.0, 4.0)]
    paths = plot_results({"run": runs}, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["goodput_vs_rate.png", "latency_vs_rate.png"]
    assert all(p.read_bytes().startswith(PNG) and p.stat().st_size > 10_000 for p in paths)
    with pytest.raises(ValueError):
        plot_results({}, tmp_path)


def test_summary_table():
    text = format_summary(fake_run(2.0, 0.1, {"ttft": 120, "tpot": 50}))
    assert text.splitlines()[0].strip("= ") == "Serving Benchmark Result"
    assert f"{'Successful requests:':<40} 4" in text
    assert f"{'Request goodput (req/s):':<40} 1.00" in text and "ttft:120 tpot:50" in text
    assert f"{'Median TTFT (ms):':<40} 100.00" in text and "P99 TPOT (ms):" in text and "P90 E2EL (ms):" in text
    assert "P50" not in text  # the median row says it
    assert "goodput" not in format_summary(fake_run(2.0, 0.1))


def test_compare_cli(tmp_path: Path, capsys):
    a, b = tmp_path / "base.json", tmp_path / "new.json"
    save_results(a, [fake_run(r, 0.2) for r in (1.0, 2.0)])
    save_results(b, [fake_run(r, 0.1, {"ttft": 150}) for r in (1.0, 2.0, 3.0)])
    assert main(["bench", "--compare", str(a), str(b), "--plot", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert out.count("base") == 2 and out.count("new") == 3
    for name in ("latency_vs_rate.png", "goodput_vs_rate.png"):
        assert (tmp_path / "cmp" / name).read_bytes().startswith(PNG)
    series = compare_series([str(a), str(a)])
    assert list(series) == ["base", "base'"]
    assert "base'" in format_comparison(series)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--target is required"),
        (["--target", "h:1", "--workload", "bogus"], "unknown workload"),
        (["--target", "h:1", "--request-rate", "2", "--sweep", "1,2"], "not both"),
        (["--target", "h:1", "--request-rate", "0"], "request rate must be > 0"),
        (["--target", "h:1", "--goodput", "ttft:fast"], "goodput SLO"),
        (["--target", "h:1", "--max-concurrency", "0"], "max_concurrency"),
        (["--target", "h:1", "--metric-percentiles", "50,101"], "metric-percentiles"),
        (["--target", "h:1", "--metric-percentiles", "p99"], "metric-percentiles"),
        (["--target", "h:1", "--scale", "0"], "--scale"),
        (["--target", "h:1", "--workload", "trace:x.csv", "--request-rate", "3"], "replays its own"),
        (["--compare", "/nonexistent.json"], "cannot read"),
    ],
)
def test_cli_argument_errors_exit_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
