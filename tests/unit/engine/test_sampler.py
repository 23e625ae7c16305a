"""Sampler: greedy, top-k / top-p truncation, seeded reproducibility, distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.request import SamplingParams
from engine.sampler import _truncate, sample

V = 50


def logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits(16)
    tokens, lps = sample(x, [SamplingParams(temperature=0.0)] * 16, list(range(16)))
    assert tokens == x.argmax(-1).tolist()
    assert lps == [None] * 16


def test_greedy_rows_unaffected_by_sampled_rows_in_the_batch():
    x = logits(6)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=1)] * 3
    tokens, _ = sample(x, params, [0] * 6)
    assert tokens[0::2] == x[0::2].argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=5.0, top_k=1, seed=3),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=2.0, top_p=1e-6, top_k=10),
    ],
    ids=["top_k=1", "top_k=1-hot", "top_p-tiny", "top_p-tiny+top_k"],
)
def test_degenerate_truncation_equals_greedy(params):
    x = logits(64, seed=1)
    tokens, _ = sample(x, [params] * 64, list(range(64)))
    assert tokens == x.argmax(-1).tolist()


def test_top_k_keeps_exactly_k_largest():
    row = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    out = _truncate(row, 2, 1.0)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(_truncate(row, 0, 1.0), row) and torch.equal(_truncate(row, 99, 1.0), row)


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = _truncate(probs.log(), 0, top_p)
    assert {i for i in range(4) if math.isfinite(out[i])} == kept
    # kept logits are unchanged, in their original positions
    assert all(out[i] == probs.log()[i] for i in kept)


def test_seeded_sampling_reproducible_and_independent_of_batch():
    x = logits(8, seed=2)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(x[i : i + 1], [p], [i])[0][0] for i in range(8)]
    # same rows inside a batch with other (seeded and unseeded) requests, in another order
    others = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, seed=99)]
    order = list(reversed(range(8)))
    batch = torch.cat([x[order], logits(2, seed=5)])
    tokens, _ = sample(batch, [p] * 8 + others, order + [0, 0])
    assert tokens[:8] == [alone[i] for i in order]
    again, _ = sample(x, [p] * 8, list(range(8)))
    assert again == alone


def test_seed_and_token_index_change_the_draw():
    flat = torch.zeros(1, 1000)  # uniform over 1000 tokens: equal draws are 1-in-1000 events
    draw = lambda seed, idx: sample(flat, [SamplingParams(temperature=1.0, seed=seed)], [idx])[0][0]  # noqa: E731
    by_index = [draw(7, i) for i in range(20)]
    by_seed = [draw(s, 0) for s in range(20)]
    assert len(set(by_index)) > 15 and len(set(by_seed)) > 15


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.6, 0), (2.0, 3)])
def test_sampling_distribution_matches_softmax(temperature, top_k):
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 0.2])
    n = 6000
    params = [SamplingParams(temperature=temperature, top_k=top_k, seed=s) for s in range(n)]
    tokens, _ = sample(base.expand(n, -1).contiguous(), params, [0] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double() / n
    scaled = base / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    expected = torch.softmax(scaled.double(), -1)
    assert counts[expected == 0].sum() == 0  # truncated tokens are never drawn
    # 5 standard errors of a binomial proportion; draws are seeded, so this is deterministic
    tol = 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-9
    assert torch.all((counts - expected).abs() <= tol), (counts, expected)


def test_logprobs_match_log_softmax_of_raw_logits():
    x = logits(4, seed=3)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=1, logprobs=0),
        SamplingParams(temperature=2.0, seed=2, logprobs=3),
    ]
    tokens, lps = sample(x, params, [0, 0, 0, 0])
    ref = torch.log_softmax(x.double(), -1)
    assert lps[1] is None
    for i in (0, 2, 3):
        lp = lps[i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
        n = params[i].logprobs
        assert len(lp.top) == n
        top = torch.topk(ref[i], n) if n else None
        if top is not None:
            assert list(lp.top) == top.indices.tolist()
            assert list(lp.top.values()) == pytest.approx(top.values.tolist(), abs=1e-5)
    assert lps[0].top[tokens[0]] == pytest.approx(lps[0].logprob)  # greedy token is the top-1


def test_invalid_params_rejected():
    for bad in (
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"max_tokens": 0},
        {"logprobs": 21},
        {"stop": ("",)},
    ):
        (field,) = bad
        with pytest.raises(ValueError, match=field):  # the error names the field it refuses
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)
