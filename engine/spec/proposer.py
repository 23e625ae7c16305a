"""The proposer interface: every way of guessing a request's next tokens looks like this.

Lifecycle of one request through a proposer (the engine step drives it):

    propose(inputs, k)        each step in which the policy gave the request k > 0; the
                              input carries every known token (prompt + accepted output,
                              never draft tokens)
    on_accepted(id, m)        after the target verified that proposal: m of its tokens were
                              accepted (0 <= m <= len(proposal)); called for every non-empty
                              proposal, before the request's next propose
    release(id)               the request finished, was aborted or preempted: drop its state
                              (a draft model frees its KV blocks here)

A proposer may return fewer tokens than asked (the n-gram proposer when fewer tokens follow
the match or nothing matches; the draft when its KV pool is full), never more, and an entry
for every input (empty when k = 0). It never sees or changes the target's KV.

Tokens and probabilities: a ``Proposal`` of k tokens carries ``probs`` [k, V] when its tokens
were *sampled* from a proposal distribution q (a draft model serving a temperature > 0
request): rejection sampling needs q to stay exact. ``probs is None`` means the tokens were
chosen deterministically (n-gram lookup, greedy draft): q is then the one-hot distribution of
each token, which rejection sampling handles exactly too (engine/spec/verify.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from engine.request import SamplingParams


@dataclass(frozen=True)
class ProposalInput:
    """One request as a proposer sees it.

    token_ids: prompt + accepted output tokens (no draft tokens), len >= 1. The proposal
        continues it: proposal token j would sit at position ``len(token_ids) + j``.
    num_prompt_tokens: how many of ``token_ids`` are the prompt (seeds count output tokens).
    params: the request's sampling parameters (greedy vs sampled drafts, seed).
    """

    request_id: str
    token_ids: Sequence[int]
    num_prompt_tokens: int
    params: SamplingParams

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"request {self.request_id!r}: ProposalInput.token_ids must not be empty")
        if not 0 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(
                f"request {self.request_id!r}: num_prompt_tokens {self.num_prompt_tokens} "
                f"outside [0, {len(self.token_ids)}]"
            )

    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far == the output index of proposal token 0."""
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class Proposal:
    """token_ids: the k proposed tokens (k may be 0).
    probs: [k, V] fp32 rows of the distribution each token was drawn from, or None when the
        tokens were chosen deterministically (q one-hot)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.probs is not None and (self.probs.dim() != 2 or self.probs.shape[0] != len(self.token_ids)):
            raise ValueError(f"Proposal.probs must be [{len(self.token_ids)}, V], got {tuple(self.probs.shape)}")

    def __len__(self) -> int:
        return len(self.token_ids)


EMPTY_PROPOSAL = Proposal([])


@runtime_checkable
class Proposer(Protocol):
    """Proposes draft tokens; ``name`` keys its acceptance statistics ("ngram", "draft_model")."""

    name: str

    def propose(self, requests: Sequence[ProposalInput], k: Mapping[str, int]) -> dict[str, Proposal]:
        """At most ``k[id]`` tokens for each input (missing ids: 0); an entry for every input."""
        ...

    def on_accepted(self, request_id: str, num_accepted: int) -> None:
        """The target accepted the first ``num_accepted`` tokens of the last proposal."""
        ...

    def release(self, request_id: str) -> None:
        """Forget the request (finished, aborted or preempted); unknown ids are ignored."""
        ...
