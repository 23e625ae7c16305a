"""Workload shapes (means / sd after scaling), spec parsing, JSONL and CSV trace files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.tools.bench.workloads import (
    AZURE,
    BenchRequest,
    Workload,
    WorkloadError,
    clip_to_context,
    parse_workload,
    read_jsonl,
    read_trace,
)

N = 20_000


def lengths(spec: str, n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    ins, outs, _ = parse_workload(spec).sample_lengths(n, np.random.default_rng(seed), scale)
    return ins, outs


def test_parse_specs():
    assert parse_workload("fixed:128:32") == Workload("fixed", 128, 32, 0.0)
    assert parse_workload("random:100:20") == Workload("random", 100, 20, 0.5)
    assert parse_workload("random:100:20:0.1") == Workload("random", 100, 20, 0.1)
    assert parse_workload("azure-code") == Workload("azure-code")
    assert parse_workload("jsonl:/a/b.jsonl") == Workload("jsonl", path="/a/b.jsonl")
    assert parse_workload("trace:c:/x.csv").path == "c:/x.csv" and parse_workload("trace:x.csv").timed
    bad = ("fixed:1", "fixed:a:b", "fixed:0:5", "fixed:1:2:0.5", "random:1:1:1.5", "random:1:1:-0.1", "jsonl:")
    for spec in (*bad, "bogus", "azure-code:1", ""):
        with pytest.raises(WorkloadError):
            parse_workload(spec)


def test_fixed_lengths_are_exact_and_ids_inside_the_vocab():
    reqs = parse_workload("fixed:64:8").sample(50, np.random.default_rng(0), vocab_size=100)
    assert all(len(r.prompt) == r.prompt_len == 64 and r.output_len == 8 for r in reqs)
    ids = np.concatenate([r.prompt for r in reqs])
    assert ids.min() >= 1 and ids.max() < 100 and len(set(ids.tolist())) > 90  # uniform over [1, 100)
    assert all(r.arrival_s is None for r in reqs)
    half = parse_workload("fixed:64:8").sample(5, np.random.default_rng(0), scale=0.5)
    assert all(r.prompt_len == 32 and r.output_len == 4 for r in half)


def test_random_lengths_range_and_mean():
    p, o = lengths("random:200:40:0.25", N, seed=1)
    assert p.min() >= 150 and p.max() <= 250 and o.min() >= 30 and o.max() <= 50
    assert p.mean() == pytest.approx(200, rel=0.01) and o.mean() == pytest.approx(40, rel=0.01)
    assert len(set(p.tolist())) == 101  # every length of [150, 250] occurs


@pytest.mark.parametrize("name", ["azure-code", "azure-conv"])
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_azure_shapes_match_the_trace_moments_after_scaling(name, scale):
    pdist, odist = AZURE[name]
    p, o = lengths(name, N, seed=7, scale=scale)
    assert p.mean() == pytest.approx(pdist.mean * scale, rel=0.05)
    assert p.std() == pytest.approx(pdist.sd * scale, rel=0.06)
    if scale * odist.mean >= 20:  # smaller outputs are dominated by rounding and the floor of 1 token
        assert o.mean() == pytest.approx(odist.mean * scale, rel=0.05)
        # code outputs are heavy-tailed (lognormal CV 2.1): their sample sd converges slowly
        assert o.std() == pytest.approx(odist.sd * scale, rel=0.06 if name == "azure-conv" else 0.3)
    assert p.min() >= 1 and o.min() >= 1


def test_azure_code_output_median_is_the_trace_shape():
    # lognormal median = mean / sqrt(1 + CV^2): 28 / sqrt(1 + (60/28)^2) = 11.8 (the trace's median is 13)
    _, o = lengths("azure-code", N, seed=2)
    assert np.median(o) == pytest.approx(11.8, abs=1.0)


def test_tiny_scale_keeps_at_least_one_token():
    p, o = lengths("azure-conv", 500, seed=0, scale=1e-4)
    assert p.min() == 1 and o.min() == 1
    with pytest.raises(WorkloadError, match="scale"):
        parse_workload("azure-conv").sample(5, np.random.default_rng(0), scale=0.0)
    with pytest.raises(WorkloadError, match="at least one"):
        parse_workload("azure-conv").sample(0, np.random.default_rng(0))


def test_clip_to_context():
    budget_reqs = [
        BenchRequest(list(range(1, 11)), 10, 5),  # fits: untouched
        BenchRequest(list(range(1, 101)), 100, 10),  # long prompt: cut to 99 - 10
        BenchRequest(list(range(1, 21)), 20, 500),  # long output: cut to what the prompt leaves
        BenchRequest(list(range(1, 201)), 200, 200, 1.5),  # both: output keeps half the context
        BenchRequest("text is left alone", 4, 500),
    ]
    out, clipped = clip_to_context(budget_reqs, 100)
    assert clipped == 3
    assert [(r.prompt_len, r.output_len) for r in out] == [(10, 5), (89, 10), (20, 79), (50, 49), (4, 500)]
    assert all(len(r.prompt) == r.prompt_len for r in out[:4]) and out[3].arrival_s == 1.5
    with pytest.raises(WorkloadError):
        clip_to_context(budget_reqs, 2)


def test_jsonl_reads_text_and_ids_and_cycles(tmp_path: Path):
    f = tmp_path / "w.jsonl"
    f.write_text('{"prompt": "Hello there, world", "output_tokens": 7}\n\n{"prompt": [5, 6, 7], "output_tokens": 2}\n')
    reqs = read_jsonl(str(f))
    assert reqs == [BenchRequest("Hello there, world", 4, 7), BenchRequest([5, 6, 7], 3, 2)]
    cycled = Workload("jsonl", path=str(f)).sample(5, np.random.default_rng(0))
    assert [r.output_len for r in cycled] == [7, 2, 7, 2, 7]


@pytest.mark.parametrize(
    "body, match",
    [
        ("not json\n", r"w.jsonl:1: not JSON"),
        ('{"prompt": "a", "output_tokens": 1}\n[1, 2]\n', r"w.jsonl:2: expected an object"),
        ('{"output_tokens": 3}\n', "'prompt' must be"),
        ('{"prompt": "", "output_tokens": 3}\n', "'prompt' must be"),
        ('{"prompt": [1, "a"], "output_tokens": 3}\n', "'prompt' must be"),
        ('{"prompt": "a", "output_tokens": 0}\n', "'output_tokens' must be"),
        ('{"prompt": "a", "output_tokens": true}\n', "'output_tokens' must be"),
        ('{"prompt": "a", "output_tokens": "5"}\n', "'output_tokens' must be"),
        ("\n\n", "no requests"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, body, match):
    f = tmp_path / "w.jsonl"
    f.write_text(body)
    with pytest.raises(WorkloadError, match=match):
        read_jsonl(str(f))


def test_missing_files(tmp_path: Path):
    with pytest.raises(WorkloadError, match="cannot read"):
        read_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(WorkloadError, match="cannot read"):
        read_trace(str(tmp_path / "nope.csv"))


AZURE_CSV = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
    "2023-11-16 18:17:03.9799600,4808,10\r\n"
    "2023-11-16 18:17:04.0319600,3180,8\r\n"
    "2023-11-16 18:17:05.5000000,110,27"  # no final newline, like the Azure files
)


def test_trace_csv_offsets_and_replay(tmp_path: Path):
    f = tmp_path / "t.csv"
    f.write_bytes(AZURE_CSV.encode())
    rows = read_trace(str(f))
    assert [(p, o) for _, p, o in rows] == [(4808, 10), (3180, 8), (110, 27)]
    assert [t for t, _, _ in rows] == pytest.approx([0.0, 0.052, 1.52004])
    reqs = Workload("trace", path=str(f)).sample(2, np.random.default_rng(0), scale=0.01, vocab_size=30)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(48, 1), (32, 1)]
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.052])
    assert all(max(r.prompt) < 30 for r in reqs)
    assert len(Workload("trace", path=str(f)).sample(10, np.random.default_rng(0))) == 3  # stops at the end


@pytest.mark.parametrize(
    "body, match",
    [
        ("time,in,out\n", "header must be"),
        ("", "header must be"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no rows"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5\n", r"t.csv:2: expected 3 columns"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,5\n", r"t.csv:2: "),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,x\n", r"t.csv:2: "),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,0,5\n", "must be >= 1"),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,5\n2023-11-16 18:17:04+00:00,5,5\n",
            "UTC offset",
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,5\n2023-11-16 18:17:02,5,5\n",
            r"t.csv:3: timestamps go backwards",
        ),
    ],
)
def test_trace_errors(tmp_path: Path, body, match):
    f = tmp_path / "t.csv"
    f.write_text(body)
    with pytest.raises(WorkloadError, match=match):
        read_trace(str(f))


REPO = Path(__file__).resolve().parents[5]
EXCERPTS = sorted((REPO / "cluster" / "tools" / "sim" / "data").glob("*.csv"))


def test_trace_excerpts_are_shipped():
    assert EXCERPTS, "no trace excerpt under cluster/tools/sim/data/"


@pytest.mark.parametrize("path", EXCERPTS, ids=lambda p: p.name)
def test_shipped_trace_excerpts_parse(path: Path):
    with open(path, newline="") as f:
        header = f.readline().strip()
    assert header == ",".join(("TIMESTAMP", "ContextTokens", "GeneratedTokens")), (
        f"{path.name} is not an Azure-format trace"
    )
    rows = read_trace(str(path))
    assert rows[0][0] == 0.0 and all(b[0] >= a[0] for a, b in zip(rows, rows[1:]))


def test_the_shipped_prompt_sets_load_as_jsonl_workloads():
    """benchmarks/data/ (the speculation sweep's prompts): ChatML text prompts of 64 output
    tokens; every lookup prompt quotes a passage that its answer can copy from."""
    data = Path(__file__).resolve().parents[5] / "benchmarks" / "data"
    for name, count in (("lookup_prompts.jsonl", 48), ("chat_prompts.jsonl", 32)):
        reqs = parse_workload(f"jsonl:{data / name}").sample(count, np.random.default_rng(0))
        assert len({r.prompt for r in reqs}) == count  # no repeats within one pass
        for r in reqs:
            assert r.prompt.startswith("<|im_start|>user\n") and r.prompt.endswith("<|im_start|>assistant\n")
            assert r.output_len == 64
    lookup = parse_workload(f"jsonl:{data / 'lookup_prompts.jsonl'}").sample(48, np.random.default_rng(0))
    assert all(len(r.prompt.split("\n\n", 1)[1]) > 200 for r in lookup)  # the passage after the task line
