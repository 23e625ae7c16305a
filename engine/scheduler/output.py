"""SchedulerOutput: what one engine step computes. Plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: str
    # tokens whose K/V this step computes: a prompt chunk, or 1 for decode, followed by
    # ``num_draft_tokens`` draft tokens to verify
    token_ids: list[int]
    start_pos: int  # position of token_ids[0] == request.num_computed_tokens before the step
    block_ids: list[int]  # the request's whole block table (covers start_pos + len(token_ids))
    sample: bool  # this step reaches the end of the known tokens: sample the next token
    params: SamplingParams
    num_output_tokens: int  # tokens generated so far (seeds per-token sampling deterministically)
    # speculative decoding: the last num_draft_tokens of token_ids are drafts (k); the step
    # scores the last k + 1 rows and emits 1..k+1 tokens. 0: a plain entry (sample: one row).
    num_draft_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # ids sent back to waiting this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_draft_tokens(self) -> int:
        return sum(s.num_draft_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def written_blocks(self, block_size: int) -> tuple[int, ...]:
        """Every block the step's tokens are written to, in schedule order, each once."""
        ids: dict[int, None] = {}
        for sr in self.scheduled:
            end = sr.start_pos + sr.num_tokens
            ids.update(dict.fromkeys(sr.block_ids[sr.start_pos // block_size : (end - 1) // block_size + 1]))
        return tuple(ids)
