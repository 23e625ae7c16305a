"""Request lifecycle data: SamplingParams, Request, RequestStatus, FinishReason.

Lifecycle: WAITING -> RUNNING -> (PREEMPTED -> WAITING -> RUNNING)* -> FINISHED_*.
In prefill-only mode a request whose prompt is done becomes PREFILLED: its first token is
known and its KV blocks stay held until the worker releases them after the transfer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context limit
    ABORT = "abort"  # cancelled by the client or failed


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREFILLED = "prefilled"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = disabled
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0 = only the chosen one)
    # speculative decoding may propose draft tokens for this request (an engine without a
    # speculative config ignores it; False: always one token per step)
    allow_speculation: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class StopStringChecker(Protocol):
    """Incremental detokenizer injected by the engine for requests with stop strings."""

    def append(self, token_id: int) -> bool:
        """Add one generated token; True when a stop string has appeared in the text."""
        ...


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prefix-cache hits at first scheduling (-1: not yet scheduled)
    num_preemptions: int = 0
    stop_checker: StopStringChecker | None = None
    max_model_len: int | None = None  # context cap: prompt + output never exceed it
    # speculative decoding: the draft tokens proposed for the next step (continuing
    # all_token_ids; never part of it). Set by the engine before schedule(), consumed by that
    # step (the scheduler may verify fewer or drop them), cleared after it.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> FinishReason | None:
        """Record a sampled token and return why the request must stop, if it must."""
        self.output_token_ids.append(token_id)
        p = self.params
        stopped_by_string = self.stop_checker is not None and self.stop_checker.append(token_id)
        if (not p.ignore_eos and token_id in self.eos_token_ids) or token_id in p.stop_token_ids or stopped_by_string:
            return FinishReason.STOP
        if len(self.output_token_ids) >= p.max_tokens:
            return FinishReason.LENGTH
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
