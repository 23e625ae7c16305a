"""Plain-greedy steps of a tensor-parallel engine (TPReductions.greedy_tokens): each rank takes
the maximum of its vocabulary slice and the ranks all-gather one (maximum, id) pair per row,
instead of every rank's logits. The tokens must be what the gathered logits' argmax gives,
ties across ranks and ceil-split padding included."""

from __future__ import annotations

import pytest
import torch

from engine.models.tensor_parallel import ShardPlan, TPReductions
from tests.unit.engine.gloo_ranks import comms_of, run_ranks


def _plan(rank: int, world: int, vocab: int) -> ShardPlan:
    return ShardPlan(rank, world, heads=1, kv_heads=1, intermediate=1, vocab=vocab, vocab_shard=-(-vocab // world))


def _local(full: torch.Tensor, plan: ShardPlan, pad_value: float) -> torch.Tensor:
    """Rank ``plan.rank``'s [N, Vs] slice of ``full`` [N, V]; the ceil split's padding columns
    set to ``pad_value`` (above every real logit: they must be ignored)."""
    out = torch.full((full.shape[0], plan.vocab_shard), pad_value)
    part = full[:, plan.vocab_start : plan.vocab_end]
    out[:, : part.shape[1]] = part
    return out


@pytest.mark.parametrize("world,vocab", [(2, 10), (2, 9), (3, 7), (4, 9)])
def test_greedy_tokens_are_the_gathered_logits_argmax(world: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(world * 100 + vocab)
    full = torch.randint(-3, 4, (64, vocab), generator=g).float()  # small integers: many ties
    full[0] = 0.0  # every id ties: id 0
    full[1, vocab - 1] = 9.0  # the last rank's last real column
    full[2, :] = -5.0
    full[2, [vocab // 2, vocab - 1]] = 1.0  # a tie across ranks: the lower id
    comms = comms_of("gloo", world)

    def rank(r: int) -> tuple[list[int], torch.Tensor]:
        plan = _plan(r, world, vocab)
        tp = TPReductions(plan, comms[r])
        local = _local(full, plan, pad_value=100.0)
        return tp.greedy_tokens(local), tp.gather_logits(local)

    out = run_ranks(rank, world)
    want = full.argmax(dim=1).tolist()
    assert want[:3] == [0, vocab - 1, vocab // 2]
    for tokens, gathered in out:
        assert tokens == want
        assert tokens == gathered.argmax(dim=1).tolist()  # what the logits path picks
    if -(-vocab // world) * world > vocab:
        assert max(max(t) for t, _ in out) < vocab  # no padding column ever won


def test_a_tp_engine_takes_greedy_tokens_without_gathering_logits(tiny_checkpoint, monkeypatch) -> None:
    """Greedy rows never gather the logits (the path the test above checks is the one taken);
    a logprobs row still does, on every rank."""
    from engine.llm import build_engine_config
    from engine.request import Request, SamplingParams
    from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, build_tp_cores

    ckpt = tiny_checkpoint(
        "llama", vocab_size=515, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128
    )
    cores = build_tp_cores(build_engine_config(ckpt, block_size=8, num_blocks=32), 2, "tp/greedy-tokens")
    follower = TPFollower(cores[1], "tp/greedy-tokens#1")
    leader = TPLeaderEngine(cores[0], [follower])
    gathers: list[int] = []
    real = TPReductions.gather_logits
    monkeypatch.setattr(TPReductions, "gather_logits", lambda self, local: (gathers.append(1), real(self, local))[1])
    try:
        greedy = Request("g", [5, 9, 2, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        leader.add_request(greedy)
        while leader.has_work():
            leader.step()
        assert len(greedy.output_token_ids) == 4 and gathers == []
        lp = Request("lp", [5, 9, 2, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1))
        leader.add_request(lp)
        while leader.has_work():
            leader.step()
        assert lp.output_token_ids == greedy.output_token_ids  # the same argmax either way
        assert len(gathers) == 2 * 4  # both ranks, every token
    finally:
        follower.stop(10.0)
