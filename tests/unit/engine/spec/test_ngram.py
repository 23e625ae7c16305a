"""Prompt-lookup n-gram proposer: vLLM's semantics, checked against a brute-force reference."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.request import SamplingParams
from engine.spec.ngram import NgramProposer, find_ngram_proposal
from engine.spec.proposer import ProposalInput, Proposer


def reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Longest n in [min_n, max_n] whose suffix recurs earlier; earliest occurrence wins."""
    n_tok = len(tokens)
    for n in range(min(max_n, n_tok - 1), min_n - 1, -1):
        suffix = tokens[n_tok - n :]
        for start in range(0, n_tok - n):  # occurrence tokens[start:start+n], ending before the last token
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_vllm_docstring_example():
    # vLLM: [1,2,3,4,2,3], min 2, max 3, k 4: [4,2,3] has no earlier match, [2,3] does -> [4,2,3]
    assert find_ngram_proposal(np.array([1, 2, 3, 4, 2, 3]), 2, 3, 4).tolist() == [4, 2, 3]


def test_longest_match_wins_over_earlier_shorter_one():
    # suffix [7, 8, 9]: "8 9" occurs at the start (followed by 1), "7 8 9" later (followed by 5)
    toks = [8, 9, 1, 7, 8, 9, 5, 6, 7, 8, 9]
    assert find_ngram_proposal(np.array(toks), 1, 3, 2).tolist() == [5, 6]
    assert find_ngram_proposal(np.array(toks), 1, 2, 2).tolist() == [1, 7]  # max_n 2: the earliest "8 9"


def test_no_match_below_min_n_and_short_contexts():
    assert find_ngram_proposal(np.array([1, 2, 3, 4, 5, 3]), 2, 4, 3).size == 0  # only a 1-gram recurs
    assert find_ngram_proposal(np.array([1, 2, 3, 4, 5, 3]), 1, 4, 3).tolist() == [4, 5, 3]
    assert find_ngram_proposal(np.array([5]), 1, 3, 3).size == 0
    assert find_ngram_proposal(np.array([5, 5]), 1, 3, 3).tolist() == [5]  # the proposal runs into the suffix
    assert find_ngram_proposal(np.array([1, 2, 1, 2]), 2, 2, 0).size == 0


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(seed):
    rng = random.Random(seed)
    for _ in range(300):
        n_tok = rng.randint(1, 40)
        toks = [rng.randint(0, rng.choice([2, 3, 6])) for _ in range(n_tok)]
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 6)
        k = rng.randint(1, 6)
        assert find_ngram_proposal(np.array(toks, dtype=np.int64), lo, hi, k).tolist() == reference(toks, lo, hi, k), (
            toks,
            lo,
            hi,
            k,
        )


def _inp(rid: str, toks: list[int]) -> ProposalInput:
    return ProposalInput(rid, toks, 1, SamplingParams(temperature=0.0))


def test_proposer_protocol_k_per_request_and_growing_inputs():
    p = NgramProposer(1, 3)
    assert isinstance(p, Proposer)
    a = [1, 2, 3, 9, 1, 2]
    b = [4, 4, 4]
    out = p.propose([_inp("a", a), _inp("b", b), _inp("c", [7, 8])], {"a": 2, "b": 5})
    assert out["a"].token_ids == [3, 9] and out["a"].probs is None
    assert out["b"].token_ids == [4]
    assert out["c"].token_ids == []  # k missing: 0
    # the request grows (incremental copy) and is then replaced by a different sequence
    a2 = [*a, 3, 9, 5, 1, 2, 3]
    assert p.propose([_inp("a", a2)], {"a": 3}).get("a").token_ids == reference(a2, 1, 3, 3)
    other = [6, 6, 7, 6, 6]
    assert p.propose([_inp("a", other)], {"a": 3})["a"].token_ids == reference(other, 1, 3, 3)
    p.on_accepted("a", 1)
    p.release("a")
    p.release("never-seen")
    assert p.propose([_inp("a", a)], {"a": 2})["a"].token_ids == [3, 9]  # deterministic


def test_long_context_is_handled():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50, 20_000)
    toks[-5:] = toks[100:105]
    got = find_ngram_proposal(toks, 2, 5, 4)
    assert got.tolist() == reference(toks.tolist(), 2, 5, 4)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramProposer(3, 2)
