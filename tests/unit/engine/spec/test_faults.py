"""A proposer fault fails over to no speculation, never to a wrong token.

Injected faults (engine/spec/speculator.py, "Proposer faults"): the n-gram lookup raising,
the draft model's forward raising after it grew its KV, the draft's rollback raising, a
proposal longer than asked. Each time: the greedy output equals engine.LLM's without
speculation token for token, the target's and the draft's pools are back to full, the
fault is counted (SpecStats, the worker's SpeculationReport); repeated faults disable the
proposer for the engine's life.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from engine.config import SpeculativeConfig
from engine.llm import LLM
from engine.models.self_draft import build_self_draft
from engine.request import SamplingParams
from engine.runtime.stats import speculation_report
from engine.spec.ngram import NgramProposer
from engine.spec.proposer import Proposal, ProposalInput
from engine.spec.speculator import MAX_CONSECUTIVE_FAULTS
from tests.unit.engine.test_spec_engine import BS, GREEDY, PROMPTS, assert_pools_full, run, spec_engine


@pytest.fixture(scope="module")
def target_dir(tiny_checkpoint):
    return tiny_checkpoint("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory):
    return build_self_draft(target_dir, 2, str(tmp_path_factory.mktemp("fault_draft") / "d2"))


@pytest.fixture(scope="module")
def reference(target_dir) -> list[list[int]]:
    llm = LLM(target_dir, skip_tokenizer_init=True, num_blocks=256, block_size=BS)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


class Boom(RuntimeError):
    pass


class FaultyNgram(NgramProposer):
    """N-gram lookup that raises on the propose calls numbered in ``fail_calls`` (1-based),
    or on every call from ``fail_from`` on."""

    def __init__(self, fail_calls: Sequence[int] = (), fail_from: int | None = None):
        super().__init__(1, 3)
        self.fail_calls, self.fail_from = set(fail_calls), fail_from
        self.calls = 0

    def propose(self, requests: Sequence[ProposalInput], k: Mapping[str, int]) -> dict[str, Proposal]:
        self.calls += 1
        if self.calls in self.fail_calls or (self.fail_from is not None and self.calls >= self.fail_from):
            raise Boom(f"injected fault in propose call {self.calls}")
        return super().propose(requests, k)


def test_intermittent_lookup_faults_skip_speculation_for_their_step(target_dir, reference):
    proposer = FaultyNgram(fail_calls=(2, 5, 9))
    engine = spec_engine(
        target_dir, SpeculativeConfig("ngram", 4, policy="fixed", prompt_lookup_min=1), proposer=proposer
    )
    assert run(engine, PROMPTS) == reference
    st = engine.spec_stats()
    assert st.proposer_faults == 3 and not st.proposer_disabled
    assert st.accepted_tokens > 0  # speculation went on between the faults
    assert proposer.calls > 9
    assert_pools_full(engine)
    report = speculation_report(engine)
    assert (report.proposer_faults, report.proposer_disabled) == (3, False)


def test_repeated_faults_disable_the_proposer_for_good(target_dir, reference):
    proposer = FaultyNgram(fail_from=3)
    engine = spec_engine(
        target_dir, SpeculativeConfig("ngram", 4, policy="fixed", prompt_lookup_min=1), proposer=proposer
    )
    assert run(engine, PROMPTS) == reference
    st = engine.spec_stats()
    assert st.proposer_disabled and st.proposer_faults == MAX_CONSECUTIVE_FAULTS
    assert proposer.calls == 2 + MAX_CONSECUTIVE_FAULTS  # never called once disabled
    assert not proposer._tokens  # everything it held was released
    proposed = st.proposed_tokens
    assert run(engine, PROMPTS[:2]) == reference[:2]  # still serving, without speculation
    assert engine.spec_stats().proposed_tokens == proposed
    assert_pools_full(engine)
    assert speculation_report(engine).proposer_disabled


def test_draft_forward_fault_leaks_no_draft_blocks(target_dir, draft_dir, reference, monkeypatch):
    """The draft's forward raises after ``grow`` took its blocks (and a prompt's catch-up
    may be half done): the step decodes without drafts and the draft pool is back to full."""
    engine = spec_engine(target_dir, SpeculativeConfig("draft_model", 3, model=draft_dir, policy="fixed"))
    paged = engine.speculator.proposer.paged
    forward, calls = paged.forward, [0]

    def flaky_forward(batch, all_rows=False):
        calls[0] += 1
        if calls[0] % 7 == 3:  # round 0 or a later round, depending on k and the batch
            assert paged.num_held_blocks() > 0  # the fault strands blocks unless released
            raise Boom(f"injected draft forward fault {calls[0]}")
        return forward(batch, all_rows)

    monkeypatch.setattr(paged, "forward", flaky_forward)
    assert run(engine, PROMPTS) == reference
    st = engine.spec_stats()
    assert st.proposer_faults >= 3 and not st.proposer_disabled
    assert st.accepted_tokens > 0
    assert_pools_full(engine)


def test_draft_rollback_fault_is_counted_and_released(target_dir, draft_dir, reference, monkeypatch):
    engine = spec_engine(target_dir, SpeculativeConfig("draft_model", 3, model=draft_dir, policy="fixed"))
    paged = engine.speculator.proposer.paged
    truncate, calls = paged.truncate, [0]

    def flaky_truncate(seq_id, num_tokens):
        calls[0] += 1
        if calls[0] % 5 == 2:
            raise Boom("injected draft rollback fault")
        truncate(seq_id, num_tokens)

    monkeypatch.setattr(paged, "truncate", flaky_truncate)
    assert run(engine, PROMPTS) == reference
    st = engine.spec_stats()
    assert st.proposer_faults > 0 and st.accepted_tokens > 0
    assert_pools_full(engine)


class TooLong(NgramProposer):
    """Returns one token more than asked: a malformed proposal is a fault, not a draft."""

    def propose(self, requests: Sequence[ProposalInput], k: Mapping[str, int]) -> dict[str, Proposal]:
        return {inp.request_id: Proposal([1] * (k.get(inp.request_id, 0) + 1)) for inp in requests}


def test_a_proposal_longer_than_asked_is_a_fault(target_dir, reference):
    engine = spec_engine(target_dir, SpeculativeConfig("ngram", 2, policy="fixed"), proposer=TooLong(1, 3))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    assert run(engine, PROMPTS, params) == reference
    st = engine.spec_stats()
    assert st.proposer_disabled and st.proposed_tokens == 0
    assert_pools_full(engine)
