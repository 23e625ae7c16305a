"""Workloads: the shipped Azure trace excerpts, Poisson resampling, fixed workloads."""

from __future__ import annotations

import statistics

import pytest

from cluster.tools.sim.workload import DATA_DIR, SHIPPED, Workload, fixed, load_trace, poisson


@pytest.mark.parametrize("name", ["code", "conversation"])
def test_shipped_excerpts_load(name):
    w = load_trace(name)
    assert len(w) == 500 and w.name == name
    assert w.arrival_s[0] == 0.0
    assert list(w.arrival_s) == sorted(w.arrival_s)
    assert min(w.prompt_lens) >= 1 and min(w.output_lens) >= 1
    assert 0.5 < w.mean_rate < 20  # the full traces average 2.6 (code) and 5.5 (conversation) req/s


def test_excerpt_first_rows_match_the_source():
    code, conv = load_trace("code"), load_trace("conversation")
    # first rows of AzureLLMInferenceTrace_{code,conv}.csv
    assert (code.prompt_lens[:3], code.output_lens[:3]) == ((4808, 3180, 110), (10, 8, 27))
    assert (conv.prompt_lens[:3], conv.output_lens[:3]) == ((374, 396, 879), (44, 109, 55))
    assert code.arrival_s[1] == pytest.approx(0.052, abs=1e-6)
    # code prompts are long with short outputs; conversation the other way round (Splitwise)
    assert statistics.mean(code.prompt_lens) > statistics.mean(conv.prompt_lens)
    assert statistics.mean(code.output_lens) < statistics.mean(conv.output_lens)


def test_data_readme_names_source_and_license():
    text = (DATA_DIR / "README.md").read_text()
    assert "CC BY 4.0" in text or "CC-BY 4.0" in text
    assert "Azure" in text and "Splitwise" in text
    for f in set(SHIPPED.values()):
        assert f in text and (DATA_DIR / f).is_file()


def test_trace_file_path_and_limit(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,100,5\n10.0,50,0\n12,7,9\n")
    w = load_trace(p)
    assert w.arrival_s == (0.0, 0.5, 2.0)  # sorted, shifted to 0
    assert w.prompt_lens == (50, 100, 7) and w.output_lens == (1, 5, 9)  # 0 outputs become 1
    assert len(load_trace(p, limit=2)) == 2
    with pytest.raises(FileNotFoundError, match="no trace"):
        load_trace(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        load_trace(bad)


def test_poisson_is_seeded_and_has_the_rate():
    trace = load_trace("conversation")
    a = poisson(trace, rate=50, duration_s=200, seed=3)
    assert a == poisson(trace, rate=50, duration_s=200, seed=3)
    assert a != poisson(trace, rate=50, duration_s=200, seed=4)
    assert a.mean_rate == pytest.approx(50, rel=0.05)
    assert a.arrival_s[-1] <= 200
    pairs = set(zip(trace.prompt_lens, trace.output_lens))
    assert all(p in pairs for p in zip(a.prompt_lens, a.output_lens))  # drawn jointly
    assert len(poisson(trace, rate=50, duration_s=200, num_requests=10)) == 10


def test_transforms():
    w = load_trace("code")
    c = w.clipped(max_prompt=1000, max_output=20)
    assert max(c.prompt_lens) == 1000 and max(c.output_lens) <= 20
    s = w.scaled_lengths(0.5, 2.0)
    assert s.prompt_lens[0] == 2404 and s.output_lens[0] == 20
    r = w.at_rate(10.0)
    assert r.mean_rate == pytest.approx(10.0)
    assert w.head(5).prompt_lens == w.prompt_lens[:5]


def test_fixed_and_validation():
    f = fixed(4, prompt_len=10, output_len=3, rate=2.0)
    assert f.arrival_s == (0.0, 0.5, 1.0, 1.5)
    assert fixed(3, 10, 3).arrival_s == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        Workload("w", (1.0, 0.5), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="output lengths must be >= 1"):
        Workload("w", (0.0,), (1,), (0,))
