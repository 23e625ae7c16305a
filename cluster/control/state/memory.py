"""The in-memory state store: the default on one node, no Redis needed.

Everything lives in this process and goes with it: a restart forgets the journal (clients of
the requests in flight get UNAVAILABLE and cannot Resume), the registry and the prefix
index. Bounds: a journal expires ``journal_ttl_s`` after its last write, and at most
``memory_max_records`` journals are kept (past that the oldest finished ones go first; in-flight
ones are never dropped: the frontends' ``max_queue`` bounds them). Expiry is checked on
access and on every new journal, so nothing needs a timer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.config import StateConfig
from cluster.control.state.store import (
    JournalEnd,
    JournalRecord,
    JournalSpec,
    RouteRecord,
    StateStore,
    StoreHealth,
    WorkerRegistration,
)


@dataclass
class _Journal:
    spec: JournalSpec
    tokens: list[int] = field(default_factory=list)
    routes: list[RouteRecord] = field(default_factory=list)
    end: JournalEnd | None = None
    written_at: float = 0.0  # monotonic time of the last write


class InMemoryStateStore(StateStore):
    backend = "memory"
    durable = False

    def __init__(self, config: StateConfig | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.config = config or StateConfig()
        self._clock = clock
        self._journals: OrderedDict[str, _Journal] = OrderedDict()  # least recently written first
        self._workers: dict[str, tuple[WorkerRegistration, float]] = {}  # id -> (entry, expires at)
        self._prefix: dict[str, frozenset[int]] = {}

    def health(self) -> StoreHealth:
        return StoreHealth("memory", False, True, "in the serving process (nothing survives a restart)", 0, 0)

    # ------------------------------------------------------------ request journal
    async def journal_start(self, spec: JournalSpec) -> None:
        self._journals.pop(spec.key, None)
        self._journals[spec.key] = _Journal(spec, written_at=self._clock())
        self._evict()

    async def journal_route(self, key: str, route: RouteRecord) -> None:
        if (j := self._touch(key)) is not None:
            j.routes.append(route)

    async def journal_tokens(self, key: str, cursor: int, token_ids: Sequence[int]) -> None:
        j = self._touch(key)
        if j is None:
            return
        if cursor > len(j.tokens):
            raise ValueError(f"journal {key!r}: tokens from {cursor} but only {len(j.tokens)} journaled")
        overlap = len(j.tokens) - cursor
        j.tokens.extend(token_ids[overlap:])

    async def journal_finish(self, key: str, end: JournalEnd) -> None:
        if (j := self._touch(key)) is not None:
            j.end = end

    async def journal_reopen(self, key: str) -> None:
        if (j := self._touch(key)) is not None:
            j.end = None

    async def journal_rewrite(self, record: JournalRecord) -> None:
        key = record.spec.key
        self._journals.pop(key, None)
        self._journals[key] = _Journal(
            record.spec, list(record.token_ids), list(record.routes), record.end, written_at=self._clock()
        )
        self._evict()

    async def journal_load(self, key: str) -> JournalRecord | None:
        j = self._live(key)
        if j is None:
            return None
        return JournalRecord(j.spec, tuple(j.tokens), tuple(j.routes), j.end)

    async def journal_in_flight(self, key: str) -> bool:
        j = self._live(key)
        return j is not None and j.end is None

    async def journal_unfinished(self) -> list[str]:
        self._expire()
        return [k for k, j in self._journals.items() if j.end is None]

    def _live(self, key: str) -> _Journal | None:
        j = self._journals.get(key)
        if j is not None and self._clock() - j.written_at > self.config.journal_ttl_s:
            del self._journals[key]
            return None
        return j

    def _touch(self, key: str) -> _Journal | None:
        j = self._live(key)
        if j is not None:
            j.written_at = self._clock()
            self._journals.move_to_end(key)
        return j

    def _expire(self) -> None:
        now = self._clock()
        while self._journals:
            key, j = next(iter(self._journals.items()))
            if now - j.written_at <= self.config.journal_ttl_s:
                break
            del self._journals[key]

    def _evict(self) -> None:
        self._expire()
        excess = len(self._journals) - self.config.memory_max_records
        if excess <= 0:
            return
        for key in [k for k, j in self._journals.items() if j.end is not None][:excess]:
            del self._journals[key]

    # ------------------------------------------------------------ worker registry
    async def heartbeat(self, workers: Sequence[WorkerRegistration]) -> None:
        expires = self._clock() + self.config.heartbeat_ttl_s
        for w in workers:
            self._workers[w.worker_id] = (w, expires)

    async def deregister(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def live_workers(self) -> list[WorkerRegistration]:
        now = self._clock()
        for wid in [wid for wid, (_, expires) in self._workers.items() if expires < now]:
            del self._workers[wid]
        return [w for w, _ in self._workers.values()]

    # ------------------------------------------------------------ prefix index
    async def prefix_replace(self, worker_id: str, hashes: frozenset[int]) -> None:
        self._prefix[worker_id] = frozenset(hashes)

    async def prefix_drop(self, worker_id: str) -> None:
        self._prefix.pop(worker_id, None)

    async def prefix_load(self) -> dict[str, frozenset[int]]:
        return dict(self._prefix)
