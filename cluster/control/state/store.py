"""The state store interface: what the control plane keeps beyond one request's coroutine.

Three kinds of state, one ``StateStore`` (backends: ``memory.py``, in the serving process;
``redis_store.py``, surviving it):

- the request journal: per request (keyed by the id clients resume by) its spec, every
  placement (routing decision, re-placements after failures), the tokens emitted so far and,
  once it ended, how. The router writes a request's tokens *before* they reach the client
  (write-ahead), so a client's cursor never runs ahead of the journal: ``Resume`` after a
  restart continues exactly where the client stopped, and a finished request is replayed,
  never generated again. Records expire ``journal_ttl_s`` after their last write.
- the worker registry: one entry per worker incarnation, refreshed by the controller's health
  watcher (a heartbeat) after every successful ping. The controller's Ray health check stays
  the liveness authority: the registry only publishes its verdicts (an entry is written after
  a ping answered, removed when the controller starts replacing the worker, and expires on
  its own ``heartbeat_ttl_s`` after the last heartbeat, e.g. when the controller itself died),
  for processes that have no Ray handle of their own.
- the prefix index: full-block prefix hash -> the workers holding that block, fed by the
  workers' stats reports and read by the ``prefix`` routing policy. The router keeps it in
  memory (``prefix_index.PrefixIndex``: no store round trip on the routing path) and writes it
  through, so a restarted router routes by prefix before the first stats poll.

Availability over durability: a store that cannot reach its backend never fails a caller's
write. It turns degraded (``health()``), drops writes (counted), logs one warning per outage,
and reconnects by itself; reads that need the backend raise ``StoreUnavailable``. Callers
registered with ``on_reconnect`` rewrite what they hold (the router: its live requests).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.request import SamplingParams

# The error of a request that ended because its caller went away (a cancel, a disconnect, an
# Abort): not a completion, so Resume continues it from its journal instead of replaying it.
CANCELLED = "cancelled before it finished"


class StoreUnavailable(RuntimeError):
    """The store's backend cannot be reached now (a read that needs it cannot be answered)."""


@dataclass(frozen=True)
class JournalSpec:
    """What a request started with (the journal's first entry)."""

    key: str  # the journal key: the id clients resume by
    request_id: str  # the router's id of the run that wrote it (a continuation gets a new one)
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    origin: str  # who started it and how Resume renders it: "grpc" | "completion" | "chat" | "router"
    created_at: float  # unix time

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "request_id": self.request_id,
            "prompt": list(self.prompt_token_ids),
            "params": _params_json(self.params),
            "origin": self.origin,
            "created_at": self.created_at,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> JournalSpec:
        return JournalSpec(
            key=d["key"],
            request_id=d["request_id"],
            prompt_token_ids=tuple(d["prompt"]),
            params=SamplingParams(**d["params"]),
            origin=d["origin"],
            created_at=float(d["created_at"]),
        )


@dataclass(frozen=True)
class RouteRecord:
    """One placement of a request (its first, or one after a failure)."""

    attempt: int  # 0 for the first placement
    prefill_worker: str | None  # None: prefilled on the decode worker
    decode_worker: str
    reason: str  # the routing reason (RouteReason value)
    cursor: int  # tokens emitted before this placement (re-prefilled with the prompt)
    cause: str | None  # why the previous placement ended (FailureCause value); None for attempt 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> RouteRecord:
        return RouteRecord(**d)


@dataclass(frozen=True)
class JournalEnd:
    """How a request ended."""

    finish_reason: str  # "stop" | "length" | "abort"
    error: str | None  # set when it failed or was cancelled
    num_cached_tokens: int  # prompt tokens served from a prefix cache (usage)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> JournalEnd:
        return JournalEnd(**d)


@dataclass(frozen=True)
class JournalRecord:
    """A request as its journal tells it."""

    spec: JournalSpec
    token_ids: tuple[int, ...]  # every token emitted, in order (the cursor is their count)
    routes: tuple[RouteRecord, ...]
    end: JournalEnd | None  # None while in flight
    # False when the stream was trimmed past its first entries (journal_max_entries): the
    # tokens are incomplete, so the request cannot be continued or replayed.
    complete: bool = True

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def completed(self) -> bool:
        """It ended for a reason other than its caller leaving (stop, length, a failure):
        Resume replays it. A cancelled one (or one still in flight) is continued instead."""
        return self.end is not None and self.end.error != CANCELLED


@dataclass(frozen=True)
class WorkerRegistration:
    """A worker-registry entry: one incarnation of a worker, as the controller last saw it."""

    worker_id: str
    role: str  # configured pool role
    pool: str
    address: str | None  # KV receiver address as text (decode-capable workers)
    node_id: str | None
    incarnation: float  # the incarnation's start (unix time); a replacement has a new one
    heartbeat_at: float  # unix time of the last successful health check

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> WorkerRegistration:
        return WorkerRegistration(**d)


@dataclass(frozen=True)
class StoreHealth:
    backend: str  # "memory" | "redis"
    durable: bool  # survives a restart of the serving process
    ok: bool  # False: degraded (the backend is unreachable; writes are being dropped)
    detail: str  # one line: where it is, or why it is degraded
    outages: int  # times it turned degraded since start
    dropped_writes: int  # writes dropped while degraded (journal entries, heartbeats, index updates)

    @property
    def status(self) -> str:
        return "ok" if self.ok else "degraded"


ReconnectHook = Callable[[], Awaitable[None]]


class StateStore(abc.ABC):
    """See the module docstring. Every method runs on the event loop of the caller that
    ``start()``ed the store; none raises for an unreachable backend except the reads that
    document ``StoreUnavailable``."""

    backend: str
    durable: bool

    def __init__(self) -> None:
        self._reconnect_hooks: list[ReconnectHook] = []

    async def start(self) -> None:  # noqa: B027 (a backend without a connection needs none)
        """Connect (Redis: once; unreachable -> start degraded and keep trying)."""

    async def close(self) -> None:  # noqa: B027
        """Flush pending writes and disconnect. Idempotent."""

    @abc.abstractmethod
    def health(self) -> StoreHealth: ...

    def on_reconnect(self, hook: ReconnectHook) -> None:
        """``hook()`` runs after the backend came back from an outage (rewrite what was lost)."""
        self._reconnect_hooks.append(hook)

    # ------------------------------------------------------------ request journal
    @abc.abstractmethod
    async def journal_start(self, spec: JournalSpec) -> None:
        """Begin ``spec.key``'s journal, replacing any earlier one under that key."""

    @abc.abstractmethod
    async def journal_route(self, key: str, route: RouteRecord) -> None: ...

    @abc.abstractmethod
    async def journal_tokens(self, key: str, cursor: int, token_ids: Sequence[int]) -> None:
        """Tokens ``[cursor, cursor + len(token_ids))``; returns once they are durable (or
        dropped, when degraded). Rewriting a range already journaled is harmless."""

    @abc.abstractmethod
    async def journal_finish(self, key: str, end: JournalEnd) -> None: ...

    @abc.abstractmethod
    async def journal_reopen(self, key: str) -> None:
        """A cancelled request is continued: its end no longer holds (it is in flight again)."""

    @abc.abstractmethod
    async def journal_rewrite(self, record: JournalRecord) -> None:
        """Replace ``record.spec.key``'s journal with ``record`` as one write (after an outage:
        the writer of a live request rewrites what the store may have dropped)."""

    @abc.abstractmethod
    async def journal_load(self, key: str) -> JournalRecord | None:
        """The record, or None when there is none (never written, or expired). Raises
        StoreUnavailable when the backend cannot be read now."""

    @abc.abstractmethod
    async def journal_in_flight(self, key: str) -> bool:
        """Whether ``key``'s journal exists and has no end (cheaper than loading it).
        Raises StoreUnavailable when the backend cannot be read now."""

    @abc.abstractmethod
    async def journal_unfinished(self) -> list[str]:
        """Keys of journals without an end (requests in flight, or whose process died).
        Raises StoreUnavailable when the backend cannot be read now."""

    # ------------------------------------------------------------ worker registry
    @abc.abstractmethod
    async def heartbeat(self, workers: Sequence[WorkerRegistration]) -> None:
        """Write (or refresh) these workers' entries; each expires ``heartbeat_ttl_s`` later."""

    @abc.abstractmethod
    async def deregister(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def live_workers(self) -> list[WorkerRegistration]:
        """Entries refreshed within ``heartbeat_ttl_s``. Raises StoreUnavailable."""

    # ------------------------------------------------------------ prefix index
    @abc.abstractmethod
    async def prefix_replace(self, worker_id: str, hashes: frozenset[int]) -> None:
        """``worker_id`` now holds exactly ``hashes`` (full-block prefix hashes)."""

    @abc.abstractmethod
    async def prefix_drop(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def prefix_load(self) -> dict[str, frozenset[int]]:
        """worker id -> the hashes it holds. Raises StoreUnavailable."""

    async def _run_reconnect_hooks(self) -> None:
        for hook in self._reconnect_hooks:
            await hook()


def _params_json(p: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["stop"] = list(p.stop)
    d["stop_token_ids"] = list(p.stop_token_ids)
    return d


def assemble_tokens(pieces: Sequence[tuple[int, Sequence[int]]]) -> tuple[tuple[int, ...], bool]:
    """Tokens from journaled ``(cursor, tokens)`` pieces in write order: a piece starting
    past the end so far leaves a gap (returns ``complete=False``); overlapping ranges (a
    rewrite after a reconnect) must agree with what is there and only extend it."""
    out: list[int] = []
    complete = True
    for cursor, tokens in pieces:
        if cursor > len(out):
            complete = False
            break
        overlap = len(out) - cursor
        if list(tokens[:overlap]) != out[cursor:]:
            raise ValueError(f"journal pieces disagree at cursor {cursor}")
        out.extend(tokens[overlap:])
    return tuple(out), complete
