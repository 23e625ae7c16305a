"""The control plane's state store (store.py: the interface; memory.py and redis_store.py: the
backends; prefix_index.py: the router's in-memory prefix index)."""

from __future__ import annotations

from collections.abc import Mapping

from cluster.config import StateConfig
from cluster.control.state.memory import InMemoryStateStore
from cluster.control.state.store import (
    CANCELLED,
    JournalEnd,
    JournalRecord,
    JournalSpec,
    RouteRecord,
    StateStore,
    StoreHealth,
    StoreUnavailable,
    WorkerRegistration,
)


def make_state_store(config: StateConfig, environ: Mapping[str, str] | None = None) -> StateStore:
    """The backend ``config`` names: Redis when ``redis_url`` is set, else in memory. Not
    started: ``await store.start()`` on the loop that will use it."""
    if config.redis_url is None:
        return InMemoryStateStore(config)
    from cluster.control.state.redis_store import RedisStateStore  # imports redis only when used

    password = config.password() if environ is None else config.password(environ)
    return RedisStateStore(config, password)


__all__ = [
    "CANCELLED",
    "InMemoryStateStore",
    "JournalEnd",
    "JournalRecord",
    "JournalSpec",
    "RouteRecord",
    "StateStore",
    "StoreHealth",
    "StoreUnavailable",
    "WorkerRegistration",
    "make_state_store",
]
