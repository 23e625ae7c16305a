"""DraftProposer and PagedModel on tiny random checkpoints: proposals, rollback, handoff.

The tiny target has 4 layers; its 2-layer self-draft (engine/models/self_draft.py) is a draft
that is often wrong, and the target itself used as its own draft is one that is always right.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.kv_cache.layout import KVLayoutMismatch
from engine.llm import LLM
from engine.models.self_draft import build_self_draft
from engine.request import SamplingParams
from engine.spec.draft import DraftKV, DraftProposer
from engine.spec.ngram import NgramProposer
from engine.spec.offline import blocks_for, speculative_generate
from engine.spec.paged_model import PagedModel
from engine.spec.proposer import ProposalInput, Proposer

BS = 4  # small blocks: proposals and rollbacks cross block boundaries
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], list(range(10, 41)), [3, 3, 3, 3, 3], [42]]


@pytest.fixture(scope="module")
def target_dir(tiny_checkpoint):
    return tiny_checkpoint("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory):
    return build_self_draft(target_dir, 2, str(tmp_path_factory.mktemp("draft") / "d2"))


@pytest.fixture(scope="module")
def reference(target_dir):
    """Greedy outputs of the engine (no speculation) and its tokens."""
    llm = LLM(target_dir, skip_tokenizer_init=True, num_blocks=128, block_size=BS)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def paged(path: str, blocks: int = 64) -> PagedModel:
    return PagedModel.load(path, 512, blocks, BS)


def draft(path: str, target_dir: str, blocks: int = 64) -> DraftProposer:
    return DraftProposer.load(path, ModelConfig.from_hf_dir(target_dir), 512, blocks, BS, target_path=target_dir)


def inp(rid: str, toks: list[int], params: SamplingParams = GREEDY, prompt: int = 1) -> ProposalInput:
    return ProposalInput(rid, toks, prompt, params)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_equals_plain_greedy_output(target_dir, draft_dir, reference, k):
    nb = blocks_for(PROMPTS, GREEDY.max_tokens, k, BS)
    for proposer in (draft(draft_dir, target_dir, nb), draft(target_dir, target_dir, nb), NgramProposer(1, 3)):
        assert isinstance(proposer, Proposer)
        tgt = paged(target_dir, nb)
        run = speculative_generate(tgt, proposer, PROMPTS, GREEDY, k)
        assert run.outputs == reference, proposer.name
        assert tgt.num_free_blocks == nb  # the target's pool is back to full
        if isinstance(proposer, DraftProposer):
            assert proposer.paged.num_free_blocks == nb and proposer.paged.num_held_blocks() == 0


def test_the_target_as_its_own_draft_is_always_accepted(target_dir, reference):
    nb = blocks_for(PROMPTS, GREEDY.max_tokens, 4, BS)
    run = speculative_generate(paged(target_dir, nb), draft(target_dir, target_dir, nb), PROMPTS, GREEDY, 4)
    assert run.outputs == reference
    assert run.stats.accepted == run.stats.proposed > 0
    assert run.stats.tokens_per_step > 4


def test_drafts_are_the_draft_models_own_greedy_continuation(target_dir, draft_dir):
    """Proposals after catch-up, after rollback and after a handoff equal what the draft
    model generates greedily from the same tokens (its KV is handled right)."""
    ref_llm = LLM(draft_dir, skip_tokenizer_init=True, num_blocks=64, block_size=BS)

    def continuation(toks: list[int], k: int) -> list[int]:
        return ref_llm.generate([toks], SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True))[0].token_ids

    d = draft(draft_dir, target_dir)
    toks = list(range(20, 33))  # 13 tokens: 3 full blocks + 1
    first = d.propose([inp("a", toks)], {"a": 6})["a"]
    assert first.token_ids == continuation(toks, 6) and first.probs is None
    assert d.paged.num_computed("a") == 13 + 5
    # 2 accepted, then the target's correction 99: the draft rolls back to 13 + 2 tokens
    d.on_accepted("a", 2)
    assert d.paged.num_computed("a") == 15 and len(d.paged.block_ids("a")) == 4
    toks2 = [*toks, *first.token_ids[:2], 99]
    assert d.propose([inp("a", toks2)], {"a": 3})["a"].token_ids == continuation(toks2, 3)
    # on_accepted forgotten: the next propose rolls the rejected drafts back by itself
    toks3 = [*toks2, 7, 8]
    assert d.propose([inp("a", toks3)], {"a": 2})["a"].token_ids == continuation(toks3, 2)
    d.release("a")
    assert d.paged.num_free_blocks == d.paged.num_blocks


def test_rollback_across_block_boundaries_frees_every_rejected_block(target_dir):
    d = draft(target_dir, target_dir, blocks=16)
    toks = list(range(30, 37))  # 7 tokens
    d.propose([inp("a", toks)], {"a": 9})  # KV for 7 + 8 = 15 positions: 4 blocks
    assert len(d.paged.block_ids("a")) == 4
    d.on_accepted("a", 0)  # all rejected: back to 7 tokens, 2 blocks
    assert d.paged.num_computed("a") == 7 and len(d.paged.block_ids("a")) == 2
    assert d.paged.num_free_blocks == 14
    d.propose([inp("b", [1, 2])], {"b": 3})
    d.release("a")
    d.release("b")
    d.release("unknown")
    assert d.paged.num_free_blocks == 16


def test_a_full_draft_pool_gives_empty_proposals_not_errors(target_dir):
    d = draft(target_dir, target_dir, blocks=3)  # 12 positions
    out = d.propose([inp("a", list(range(8))), inp("b", list(range(9, 20)))], {"a": 4, "b": 4})
    assert len(out["a"]) == 4  # 8 + 3 positions fit in 3 blocks
    assert len(out["b"]) == 0 and d.stats.blocked == 1
    assert d.usage().free_blocks == 0 and d.usage().total_blocks == 3


def test_sampled_drafts_return_their_distribution_and_follow_the_seed(target_dir, draft_dir):
    params = SamplingParams(temperature=0.9, top_k=50, seed=17, max_tokens=30)
    toks = list(range(40, 50))
    runs = []
    for _ in range(2):
        d = draft(draft_dir, target_dir)
        runs.append(d.propose([inp("a", toks, params, prompt=8)], {"a": 5})["a"])
    a, b = runs
    assert a.token_ids == b.token_ids and torch.equal(a.probs, b.probs)
    assert a.probs.shape == (5, 512)
    assert torch.allclose(a.probs.sum(-1), torch.ones(5))
    assert ((a.probs > 0).sum(-1) <= 50).all()  # top-k applied to q as to p
    assert (a.probs[torch.arange(5), torch.tensor(a.token_ids)] > 0).all()


def test_prompt_kv_handoff_equals_local_catch_up(target_dir, draft_dir):
    prompt = list(range(60, 71))  # 11 tokens
    sender, receiver, local = (draft(draft_dir, target_dir) for _ in range(3))
    sender.prefill([inp("r", prompt, prompt=11)])
    kv = sender.export_kv("r")
    assert kv.pages.shape == (2, 3, 2, BS, 2, 16) and kv.token_ids == prompt
    assert receiver.import_kv("r", kv)
    assert receiver.stats.catch_up_tokens == 0
    nxt = [*prompt, 5]  # the prefill's first token
    got = receiver.propose([inp("r", nxt, prompt=11)], {"r": 4})["r"]
    want = local.propose([inp("r", nxt, prompt=11)], {"r": 4})["r"]  # computes the prompt itself
    assert got.token_ids == want.token_ids
    assert local.stats.catch_up_tokens == 11 and receiver.stats.catch_up_tokens == 0
    n = local.paged.num_computed("r")
    assert torch.allclose(receiver.paged.read_pages("r"), local.paged.read_pages("r"), atol=1e-5)
    assert n == receiver.paged.num_computed("r") == 12 + 3
    # prefill is incremental (a chunked prompt) and idempotent
    chunked = draft(draft_dir, target_dir)
    chunked.prefill([inp("r", prompt[:5], prompt=5)])
    chunked.prefill([inp("r", prompt, prompt=11)])
    chunked.prefill([inp("r", prompt, prompt=11)])
    assert torch.allclose(chunked.export_kv("r").pages, kv.pages, atol=1e-5)


def test_handoff_refuses_another_layout_and_waits_for_room(target_dir, draft_dir):
    sender = draft(target_dir, target_dir)  # 4 layers
    sender.prefill([inp("r", [1, 2, 3], prompt=3)])
    kv = sender.export_kv("r")
    receiver = draft(draft_dir, target_dir, blocks=1)  # 2 layers
    with pytest.raises(KVLayoutMismatch, match="num_layers: 2 != 4"):
        receiver.import_kv("r", kv)
    two = draft(draft_dir, target_dir, blocks=1)
    big = DraftKV(two.layout, list(range(9)), torch.zeros(2, 3, 2, BS, 2, 16))
    assert not two.import_kv("r", big)  # 3 blocks needed, 1 in the pool: no room now
    assert two.paged.num_free_blocks == 1


def test_draft_with_another_vocabulary_is_refused(target_dir, tiny_checkpoint):
    from engine.spec.config import DraftIncompatibleError

    other = tiny_checkpoint("llama", vocab_size=600)
    with pytest.raises(DraftIncompatibleError, match="vocab_size 600"):
        draft(other, target_dir)


def test_seeded_sampling_without_speculation_matches_the_engine(target_dir):
    """k = 0 through verify() gives the engine sampler's tokens (same seeds, same p)."""
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)
    llm = LLM(target_dir, skip_tokenizer_init=True, num_blocks=64, block_size=BS)
    ref = [o.token_ids for o in llm.generate(PROMPTS, params)]
    run = speculative_generate(paged(target_dir), None, PROMPTS, params, 0)
    assert run.outputs == ref
