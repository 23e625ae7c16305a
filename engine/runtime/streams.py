"""Per-request output streams that other threads (and RPC callers) long-poll by cursor.

A stream holds every token generated for a request, in order. A reader asks for tokens
from its cursor on and advances the cursor by what it got, so each token is delivered once
and in order however the polls interleave with generation. Terminal state (finish reason
or error) is set once and wakes every waiter.
"""

from __future__ import annotations

import threading

from engine.request import Request, TokenLogprobs
from engine.types import StreamChunk


class OutputStream:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.num_cached_tokens = 0
        self.prefilled_at: float | None = None  # a prefill worker's streams: see StreamChunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def publish(self, req: Request) -> None:
        """Copy the request's new tokens (and terminal state) into the stream."""
        with self._cv:
            self.token_ids.extend(req.output_token_ids[len(self.token_ids) :])
            self.logprobs.extend(req.logprobs[len(self.logprobs) :])
            self.num_cached_tokens = max(req.num_cached_tokens, 0)
            if req.finish_reason is not None and self.finish_reason is None:
                self.finish_reason = req.finish_reason.value
            self._cv.notify_all()

    def fail(self, error: str) -> None:
        with self._cv:
            if self.finish_reason is None:
                self.finish_reason, self.error = "abort", error
            self._cv.notify_all()

    def read(self, cursor: int, timeout: float | None = None) -> StreamChunk:
        """Tokens from ``cursor`` on; waits up to ``timeout`` for something new."""
        with self._cv:
            self._cv.wait_for(lambda: len(self.token_ids) > cursor or self.finished, timeout)
            return StreamChunk(
                token_ids=self.token_ids[cursor:],
                logprobs=self.logprobs[cursor:],
                finished=self.finished,
                finish_reason=self.finish_reason,
                error=self.error,
                num_cached_tokens=self.num_cached_tokens,
                prefilled_at=self.prefilled_at,
            )
