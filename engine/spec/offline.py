"""A complete speculative generation loop over PagedModel: the reference for integration, and
the offline acceptance measurement (``splitserve draft --measure``).

One target forward per step scores, for every running sequence, its last token plus its k
draft tokens (k + 1 rows, ``all_rows``), ``verify`` emits m + 1 tokens, the target's K/V of
the rejected drafts is rolled back (``truncate`` to n + m), and the proposer is told m
(``on_accepted``). The prompt is prefilled by one plain forward. This is what the engine
step will do with a scheduler in between; here every prompt runs to completion in one batch.

Invariant per sequence between steps (n = prompt + output tokens): the target's KV holds
exactly the first n - 1 tokens; the last emitted token is computed by the next step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.request import SamplingParams
from engine.spec.paged_model import PagedModel
from engine.spec.proposer import EMPTY_PROPOSAL, ProposalInput, Proposer
from engine.spec.verify import VerifyInput, verify


@dataclass
class SpecRunStats:
    """Counters of one run. Acceptance is over proposed draft tokens (vLLM's definition)."""

    target_steps: int = 0  # target forwards after the prompt forward
    emitted: int = 0  # tokens emitted by those steps
    proposed: int = 0
    accepted: int = 0
    proposed_at: list[int] = field(default_factory=list)  # [j]: drafts proposed at position j
    accepted_at: list[int] = field(default_factory=list)  # [j]: ... of which accepted
    seconds: float = 0.0  # wall time of the decode loop (prompt forward excluded)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.target_steps if self.target_steps else 0.0

    def merge(self, other: SpecRunStats) -> None:
        """Add another run's counters to these."""
        self.target_steps += other.target_steps
        self.emitted += other.emitted
        self.seconds += other.seconds
        self.proposed += other.proposed
        self.accepted += other.accepted
        n = max(len(self.proposed_at), len(other.proposed_at))
        pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
        self.proposed_at = [a + b for a, b in zip(pad(self.proposed_at), pad(other.proposed_at), strict=True)]
        self.accepted_at = [a + b for a, b in zip(pad(self.accepted_at), pad(other.accepted_at), strict=True)]

    def record(self, num_proposed: int, num_accepted: int) -> None:
        while len(self.proposed_at) < num_proposed:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        for j in range(num_proposed):
            self.proposed_at[j] += 1
            self.accepted_at[j] += j < num_accepted
        self.proposed += num_proposed
        self.accepted += num_accepted


@dataclass
class SpecRun:
    outputs: list[list[int]]  # generated ids per prompt (stops after EOS or max_tokens)
    stats: SpecRunStats


def speculative_generate(
    target: PagedModel,
    proposer: Proposer | None,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    num_speculative_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> SpecRun:
    """Generate for every prompt with k = ``num_speculative_tokens`` drafts per step (capped
    by the tokens left; 0 or no proposer: plain decoding through the same path)."""
    ids = [f"seq-{i}" for i in range(len(prompts))]
    prompt = {rid: list(p) for rid, p in zip(ids, prompts, strict=True)}
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    stats = SpecRunStats()
    stop = set() if params.ignore_eos else set(eos_token_ids) | set(params.stop_token_ids)

    def emit(rid: str, tokens: list[int]) -> bool:
        """Append tokens; True when the sequence is finished."""
        for t in tokens:
            out[rid].append(t)
            if t in stop or len(out[rid]) >= params.max_tokens:
                return True
        return False

    logits = target.forward([(rid, prompt[rid]) for rid in ids])
    first = verify(logits, [VerifyInput([], params, 0) for _ in ids])
    active = [rid for rid, r in zip(ids, first, strict=True) if not emit(rid, r.token_ids)]
    for rid in ids:
        if rid not in active:
            target.release(rid)
    start = time.perf_counter()
    while active:
        known = {rid: prompt[rid] + out[rid] for rid in active}
        want = {rid: min(num_speculative_tokens, params.max_tokens - len(out[rid]) - 1) for rid in active}
        if proposer is None or num_speculative_tokens == 0:
            props = dict.fromkeys(active, EMPTY_PROPOSAL)
        else:
            inputs = [ProposalInput(rid, known[rid], len(prompt[rid]), params) for rid in active]
            props = proposer.propose(inputs, want)
        logits = target.forward([(rid, [known[rid][-1], *props[rid].token_ids]) for rid in active], all_rows=True)
        results = verify(
            logits,
            [VerifyInput(props[rid].token_ids, params, len(out[rid]), props[rid].probs) for rid in active],
        )
        stats.target_steps += 1
        still = []
        for rid, res in zip(active, results, strict=True):
            k = len(props[rid])
            stats.record(k, res.num_accepted)
            target.truncate(rid, len(known[rid]) + res.num_accepted)  # drop rejected drafts' K/V
            if proposer is not None and k:
                proposer.on_accepted(rid, res.num_accepted)
            before = len(out[rid])
            done = emit(rid, res.token_ids)
            stats.emitted += len(out[rid]) - before
            if done:
                target.release(rid)
                if proposer is not None:
                    proposer.release(rid)
            else:
                still.append(rid)
        active = still
    stats.seconds = time.perf_counter() - start
    return SpecRun([out[rid] for rid in ids], stats)


def blocks_for(prompts: Sequence[Sequence[int]], max_tokens: int, k: int, block_size: int) -> int:
    """KV blocks that let every prompt run to max_tokens with k drafts in flight."""
    return sum(-(-(len(p) + max_tokens + k + 1) // block_size) for p in prompts)


@dataclass
class DraftMeasurement:
    """Greedy speculative decoding with a draft vs plain decoding of the same prompts."""

    k: int
    stats: SpecRunStats  # summed over the prompts
    plain_seconds: float  # the same prompts without speculation, same path
    identical_tokens: int  # tokens before the speculative output first differs from the plain one
    total_tokens: int  # tokens of the plain output

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.stats.seconds if self.stats.seconds else 0.0


def measure_draft(
    target: PagedModel,
    draft: Proposer,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> DraftMeasurement:
    """Run each prompt alone (batch 1, the latency case) greedily, plain and with ``k``
    drafts; ``target`` needs blocks for one prompt + max_tokens + k + 1."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    total = SpecRunStats()
    plain_seconds, same, count = 0.0, 0, 0
    for p in prompts:
        plain = speculative_generate(target, None, [p], params, 0, eos_token_ids)
        spec = speculative_generate(target, draft, [p], params, k, eos_token_ids)
        plain_seconds += plain.stats.seconds
        ref, got = plain.outputs[0], spec.outputs[0]
        same += next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
        count += len(ref)
        total.merge(spec.stats)
    return DraftMeasurement(k, total, plain_seconds, same, count)
