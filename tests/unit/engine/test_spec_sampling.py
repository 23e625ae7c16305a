"""temperature > 0 under speculation: the engine's output distribution is the target's.

A tiny random checkpoint, one prompt, top_k = 4 at temperature 1.0 (so each position has
exactly 4 possible tokens and three tokens have 64 possible sequences), many seeded requests
through LLM with speculation (fixed k = 2: the first token comes from the prompt step, the
next two from one verification of 2 drafts). The exact distribution of the 64 sequences comes
from the engine without speculation (its top-4 logprobs of every prefix), and a chi-square
goodness-of-fit test compares the speculative samples with it, for a draft model (sampled
drafts, q soft) and for deterministic drafts (q one-hot). The same test must reject the
draft model's own distribution (what accepting every draft would give): it has the power to
fail.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
import torch

from engine.llm import LLM
from engine.models.self_draft import build_self_draft
from engine.request import SamplingParams
from engine.spec.proposer import EMPTY_PROPOSAL, Proposal, ProposalInput

PROMPT = [17, 230, 5, 99, 41, 7]
TOP_K = 4
N = 2000  # seeded requests per run
LENGTH = 3


@pytest.fixture(scope="module")
def target_dir(tiny_checkpoint):
    return tiny_checkpoint("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory):
    return build_self_draft(target_dir, 3, str(tmp_path_factory.mktemp("spec_sampling") / "d3"))


def exact_distribution(model_dir: str) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) of ``model_dir`` at temperature 1, top-k 4, from its top-4 logprobs."""
    llm = LLM(model_dir, skip_tokenizer_init=True, num_blocks=256, block_size=4)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=TOP_K)

    def step(prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...], dict[int, float]]:
        outs = llm.generate([list(PROMPT) + list(p) for p in prefixes], one)
        dists = {}
        for p, o in zip(prefixes, outs, strict=True):
            top = o.logprobs[0].top
            z = sum(math.exp(v) for v in top.values())
            dists[p] = {t: math.exp(v) / z for t, v in top.items()}
        return dists

    probs = {(): 1.0}
    for _ in range(LENGTH):
        dists = step(list(probs))
        probs = {p + (t,): pp * q for p, pp in probs.items() for t, q in dists[p].items()}
    return probs


def sample_sequences(llm: LLM, seed0: int) -> list[tuple[int, ...]]:
    """The first LENGTH tokens of N seeded requests of LENGTH + 1 tokens (one more, so that the
    verification after the prompt step may draft 2: it emits tokens 2 and 3, and 4 when both
    are accepted)."""
    params = [
        SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=LENGTH + 1, ignore_eos=True, seed=seed0 + i)
        for i in range(N)
    ]
    return [tuple(o.token_ids[:LENGTH]) for o in llm.generate([PROMPT] * N, params)]


def chi_square_pvalue(samples: Sequence[tuple[int, ...]], probs: Mapping[tuple[int, ...], float]) -> float:
    counts = Counter(samples)
    outside = sum(n for s, n in counts.items() if s not in probs)
    if outside:
        return 0.0  # a sequence the target cannot produce
    stat = sum((counts.get(s, 0) - p * len(samples)) ** 2 / (p * len(samples)) for s, p in probs.items())
    df = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0)))


class FixedDrafts:
    """Deterministic drafts (q one-hot): the exact distribution's most likely continuation."""

    name = "fixed"

    def __init__(self, probs: Mapping[tuple[int, ...], float]):
        self.best = max(probs, key=probs.get)

    def propose(self, requests, k):
        out = {}
        for inp in requests:
            want = k.get(inp.request_id, 0)
            done = inp.num_output_tokens
            toks = list(self.best[done : done + want])
            out[inp.request_id] = Proposal(toks) if toks else EMPTY_PROPOSAL
        return out

    def on_accepted(self, request_id: str, num_accepted: int) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def target_probs(target_dir):
    probs = exact_distribution(target_dir)
    assert len(probs) == TOP_K**LENGTH and sum(probs.values()) == pytest.approx(1.0)
    return probs


def test_plain_engine_sampling_fits_the_exact_distribution(target_dir, target_probs):
    """The reference itself: sampling without speculation passes the same test."""
    llm = LLM(target_dir, skip_tokenizer_init=True, num_blocks=2048, block_size=4)
    assert chi_square_pvalue(sample_sequences(llm, 10_000), target_probs) > 1e-3


def test_draft_model_speculation_preserves_the_distribution(target_dir, draft_dir, target_probs):
    spec = {"model": draft_dir, "num_speculative_tokens": 2, "policy": "fixed"}
    llm = LLM(target_dir, skip_tokenizer_init=True, num_blocks=2048, block_size=4, speculative_config=spec)
    samples = sample_sequences(llm, 0)
    st = llm.engine.spec_stats()
    print(f"draft: acceptance {st.acceptance_rate:.3f} over {st.proposed_tokens} drafts")
    assert st.proposed_tokens >= N and 0 < st.accepted_tokens < st.proposed_tokens  # both branches ran
    assert chi_square_pvalue(samples, target_probs) > 1e-3
    # power: the draft's own distribution (every draft accepted) is rejected by the same test
    assert chi_square_pvalue(samples, exact_distribution(draft_dir)) < 1e-6


def test_deterministic_drafts_preserve_the_distribution(target_dir, target_probs):
    from engine.config import SpeculativeConfig
    from engine.engine import EngineCore
    from engine.llm import build_engine_config

    config = build_engine_config(
        target_dir,
        num_blocks=2048,
        block_size=4,
        speculative_config=SpeculativeConfig("ngram", 2, policy="fixed"),
    )
    llm = LLM.__new__(LLM)
    llm.engine = EngineCore(config, proposer=FixedDrafts(target_probs))
    llm.tokenizer, llm._ids = None, itertools.count()
    samples = sample_sequences(llm, 5_000)
    st = llm.engine.spec_stats()
    assert st.proposed_tokens >= N and 0 < st.accepted_tokens < st.proposed_tokens
    assert chi_square_pvalue(samples, target_probs) > 1e-3


def test_a_seeded_request_is_reproducible_for_the_same_k(target_dir, draft_dir):
    spec = {"model": draft_dir, "num_speculative_tokens": 3, "policy": "fixed"}
    params = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=1234)
    runs = [
        LLM(target_dir, skip_tokenizer_init=True, num_blocks=64, block_size=4, speculative_config=spec)
        .generate([PROMPT], params)[0]
        .token_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_proposal_input_carries_no_drafts():
    with pytest.raises(ValueError):
        ProposalInput("x", [], 0, SamplingParams())
