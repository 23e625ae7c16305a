"""PrefixIndex: full-block prefix hash -> the workers holding that block, in the router's memory.

Fed by the workers' stats reports (each report lists every full-block hash the worker's
prefix cache holds: ``WorkerStats.cached_block_hashes``) and, at start, by the state store's
copy (``StateStore.prefix_load``), so a restarted router routes by prefix before the first
stats poll. Read by the ``prefix`` routing policy through ``hashes_of`` (the router's load
snapshot) without a store round trip.

Invariant: ``_workers_of[h]`` contains ``w`` iff ``h in _hashes_of[w]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class PrefixIndex:
    def __init__(self) -> None:
        self._hashes_of: dict[str, frozenset[int]] = {}
        self._workers_of: dict[int, set[str]] = {}

    def replace(self, worker_id: str, hashes: Iterable[int]) -> bool:
        """``worker_id`` now holds exactly ``hashes``; returns whether that changed anything."""
        new = frozenset(hashes)
        old = self._hashes_of.get(worker_id, frozenset())
        if new == old and worker_id in self._hashes_of:
            return False
        for h in old - new:
            holders = self._workers_of[h]
            holders.discard(worker_id)
            if not holders:
                del self._workers_of[h]
        for h in new - old:
            self._workers_of.setdefault(h, set()).add(worker_id)
        self._hashes_of[worker_id] = new
        return True

    def drop(self, worker_id: str) -> None:
        self.replace(worker_id, ())
        del self._hashes_of[worker_id]

    def hashes_of(self, worker_id: str) -> frozenset[int]:
        return self._hashes_of.get(worker_id, frozenset())

    def workers_holding(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._workers_of.get(block_hash, ()))

    def leading_matches(self, prefix_hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of ``prefix_hashes`` it holds (0s omitted)."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(prefix_hashes):
            holders = self._workers_of.get(h, set())
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for w in alive:
                out[w] = i + 1
        return out

    def workers(self) -> list[str]:
        return sorted(self._hashes_of)

    def __len__(self) -> int:
        return len(self._workers_of)
