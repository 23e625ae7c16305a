"""RequestLedger: one request's output across every worker it ran on (the router's cross-worker
cursor stream).

A worker's stream delivers a request's tokens in order, each once, to a reader that advances
its cursor (engine/runtime/streams.py). The ledger does the same across placements: token
``i`` of the request is ``token_ids[i]`` whichever worker produced it, and a placement after
a failure starts at cursor ``len(token_ids)`` (the tokens so far are re-prefilled there, and
the new worker's stream numbers its tokens from 0 with them first). So the client sees no
token twice and none missing, and ``Resume`` followers read the ledger by cursor too.

Lifecycle (router event loop only): ``RequestLedger(...)`` -> ``stage(tokens)`` (handed to the
journal, before anyone sees them) -> ``append(tokens)`` (visible to readers) ... ->
``finish(reason, error)`` once. ``staged`` is what the journal holds or is writing (a rewrite
after a store outage uses it); ``token_ids`` is what readers may see: always a prefix of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from cluster.control.state.store import JournalEnd, JournalRecord, JournalSpec, RouteRecord
from engine.request import TokenLogprobs
from engine.types import RequestSpec, StreamChunk


class RequestLedger:
    def __init__(self, key: str, spec: RequestSpec, origin: str, resumed: JournalRecord | None = None):
        self.key = key  # journal key (the id clients resume by)
        self.spec = spec  # the router's run of it (request_id is this router's id)
        self.origin = origin
        self.resumed = resumed is not None
        self.journal_spec = (
            resumed.spec
            if resumed is not None
            else JournalSpec(key, spec.request_id, tuple(spec.prompt_token_ids), spec.params, origin, time.time())
        )
        emitted = list(resumed.token_ids) if resumed is not None else []
        self.token_ids: list[int] = list(emitted)
        self.staged: list[int] = list(emitted)
        # logprobs of the tokens emitted by this process (continued requests have none for the
        # tokens before the resumption; their readers start past them)
        self.logprobs: list[TokenLogprobs] = []
        self.logprobs_from = len(emitted)  # index of logprobs[0]
        self.routes: list[RouteRecord] = list(resumed.routes) if resumed is not None else []
        self.num_cached_tokens: int | None = None  # prefix-cache hits of the first prefill
        self.end: JournalEnd | None = None
        self.failed_at: float | None = None  # monotonic time of the last placement failure (recovery)
        self.last_cause: str | None = None  # FailureCause value of the last placement failure
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def context_len(self) -> int:
        """Tokens a new placement prefills: the prompt and everything emitted so far."""
        return len(self.spec.prompt_token_ids) + len(self.token_ids)

    def stage(self, tokens: Sequence[int]) -> int:
        """Hand ``tokens`` to the journal; returns their cursor."""
        assert len(self.staged) == len(self.token_ids), "one chunk at a time"
        cursor = len(self.staged)
        self.staged.extend(tokens)
        return cursor

    def append(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> None:
        self.token_ids.extend(tokens)
        assert self.token_ids == self.staged, "appended tokens differ from the staged ones"
        self.logprobs.extend(logprobs)
        self._wake()

    def finish(self, end: JournalEnd) -> None:
        if self.end is None:
            self.end = end
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def record(self) -> JournalRecord:
        """The journal record this ledger stands for (what a rewrite writes)."""
        return JournalRecord(self.journal_spec, tuple(self.staged), tuple(self.routes), self.end)

    def chunk_from(self, cursor: int) -> StreamChunk:
        """Tokens from ``cursor`` on, with the end if there is one."""
        lp_start = max(cursor - self.logprobs_from, 0)
        end = self.end
        return StreamChunk(
            token_ids=self.token_ids[cursor:],
            logprobs=self.logprobs[lp_start:] if cursor >= self.logprobs_from else [],
            finished=end is not None,
            finish_reason=end.finish_reason if end is not None else None,
            error=end.error if end is not None else None,
            num_cached_tokens=self.num_cached_tokens or 0,
        )

    async def follow(self, cursor: int) -> AsyncIterator[StreamChunk]:
        """Chunks from ``cursor`` on as they are appended, until the end (for Resume)."""
        if cursor > len(self.token_ids):
            raise ValueError(f"cursor {cursor} is past the {len(self.token_ids)} tokens generated so far")
        while True:
            changed = self._changed
            chunk = self.chunk_from(cursor)
            if chunk.token_ids or chunk.finished:
                cursor += len(chunk.token_ids)
                yield chunk
                if chunk.finished:
                    return
                continue
            await changed.wait()
