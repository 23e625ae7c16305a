"""The Redis state store: the journal, the registry and the prefix index survive a restart of
the serving process (``splitserve serve --redis URL``).

Keys (``P`` = ``StateConfig.key_prefix``; every key expires, nothing needs a sweeper):

    P:journal:<key>:spec   STRING  the request's JournalSpec (JSON)          TTL journal_ttl_s
    P:journal:<key>        STREAM  its routes, tokens and end, in order:      TTL journal_ttl_s
                                   {k: r, v: <RouteRecord JSON>}
                                   {k: t, c: <cursor>, v: "t0,t1,..."}
                                   {k: f, v: <JournalEnd JSON>}
                                   {k: o}  reopened: the end before it no longer holds
                                   trimmed past journal_max_entries (XADD MAXLEN ~)
    P:inflight             ZSET    keys of journals without an end (score: created_at)
    P:worker:<id>          STRING  WorkerRegistration (JSON)                  TTL heartbeat_ttl_s
    P:workers              SET     worker ids (members whose entry expired are pruned on read)
    P:prefix:<worker id>   SET     prefix hashes the worker holds             TTL journal_ttl_s
    P:prefix-workers       SET     worker ids with a prefix set

A journal's TTL is refreshed by its routes and end, and by its tokens at most every
``min(60 s, journal_ttl_s / 10)`` (one command per token instead of three), so it expires
between ``journal_ttl_s`` and 1.1 x that after its last write, and never while it streams.

Writes go through one writer task (group commit): every write queued while a round trip is in
flight goes out in the next pipeline, so many streams cost one round trip per batch, not per
token. ``journal_tokens`` returns once its pipeline was answered (write-ahead).

Outages: a connection error or a round trip slower than ``op_timeout_s`` turns the store
degraded: one WARNING, ``outages`` + 1, every write is dropped (counted) without touching the
network, reads raise StoreUnavailable, and a task pings Redis every ``reconnect_interval_s``.
When it answers, the store is ok again (one INFO), the prefix sets are rewritten in full, and
the ``on_reconnect`` hooks run (the router rewrites its live requests' journals). A wrong
password is not an outage: ``start()`` raises StoreConfigError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from cluster.config import REDIS_PASSWORD_ENV, StateConfig
from cluster.control.state.store import (
    JournalEnd,
    JournalRecord,
    JournalSpec,
    RouteRecord,
    StateStore,
    StoreHealth,
    StoreUnavailable,
    WorkerRegistration,
    assemble_tokens,
)

log = logging.getLogger(__name__)

Op = tuple[str, tuple, dict]  # (redis method name, args, kwargs) queued for the writer


class StoreConfigError(ValueError):
    """The Redis server refused us for a reason retrying cannot fix (wrong password, ...)."""


class RedisStateStore(StateStore):
    backend = "redis"
    durable = True

    def __init__(self, config: StateConfig, password: str | None = None, client: aioredis.Redis | None = None):
        super().__init__()
        if config.redis_url is None:
            raise ValueError("RedisStateStore needs StateConfig.redis_url")
        self.config = config
        self.url = config.redis_url
        p = config.key_prefix
        self._inflight, self._workers, self._prefix_workers = f"{p}:inflight", f"{p}:workers", f"{p}:prefix-workers"
        self._p = p
        self._redis = client or aioredis.Redis.from_url(
            config.redis_url,
            password=password,
            socket_timeout=config.op_timeout_s,
            socket_connect_timeout=config.op_timeout_s,
            retry=Retry(NoBackoff(), 0),  # a failure is an outage at once: we reconnect ourselves
            decode_responses=True,
        )
        self._has_password = password is not None or bool(urlsplit(config.redis_url).password)
        self._ok = True
        self._detail = f"redis at {_where(config.redis_url)}"
        self.outages = 0
        self.dropped_writes = 0
        self._pending: list[tuple[list[Op], asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._reconnector: asyncio.Task | None = None
        self._prefix_written: dict[str, frozenset[int]] = {}  # what Redis holds per worker, as we wrote it
        self._refreshed: dict[str, float] = {}  # journal key -> monotonic time of its last TTL refresh
        self._ttl_refresh_s = min(60.0, config.journal_ttl_s / 10)
        self._closed = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._writer is not None:
            raise RuntimeError("RedisStateStore.start() called twice")
        self._writer = asyncio.create_task(self._write_loop(), name="splitserve-state-writer")
        try:
            await asyncio.wait_for(self._redis.ping(), self.config.op_timeout_s * 4)
        except (AuthenticationError, ResponseError) as e:  # wrong password, or one is required
            await self.close()
            if self._has_password:
                raise StoreConfigError(f"redis at {_where(self.url)} refused the password: {e}") from None
            raise StoreConfigError(
                f"redis at {_where(self.url)} requires a password: set state.password_file "
                f"(--redis-password-file) or ${REDIS_PASSWORD_ENV} ({e})"
            ) from None
        except (RedisError, OSError, TimeoutError) as e:
            self._degrade(e)
            return
        log.info("state store: %s", self._detail)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await self._drain()
        for task in (self._writer, self._reconnector):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._writer, self._reconnector) if t is not None), return_exceptions=True)
        await self._redis.aclose()

    async def _drain(self) -> None:
        """Wait until every write queued so far was sent (or dropped)."""
        if self._pending:
            fut = asyncio.get_running_loop().create_future()
            self._pending.append(([], fut))
            self._wake.set()
            await fut

    def health(self) -> StoreHealth:
        return StoreHealth("redis", True, self._ok, self._detail, self.outages, self.dropped_writes)

    # ------------------------------------------------------------ writing
    async def _write(self, ops: list[Op]) -> None:
        if not self._ok or self._closed:
            self.dropped_writes += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((ops, fut))
        self._wake.set()
        await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            ops = [op for group, _ in batch for op in group]
            if ops and self._ok:
                pipe = self._redis.pipeline(transaction=False)
                for name, args, kwargs in ops:
                    getattr(pipe, name)(*args, **kwargs)
                try:
                    await pipe.execute()
                except (AuthenticationError, ResponseError) as e:  # a bug or a rotated password: loud
                    log.error("state store: Redis refused a write (%s); %d writes lost", e, len(batch))
                    self.dropped_writes += len(batch)
                except (RedisError, OSError, TimeoutError) as e:
                    self._degrade(e)
                    self.dropped_writes += len(batch)
            elif ops:
                self.dropped_writes += len(batch)
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def _degrade(self, error: BaseException) -> None:
        if not self._ok:
            return
        self._ok = False
        self.outages += 1
        self._detail = f"redis at {_where(self.url)} unreachable: {type(error).__name__}: {error}"
        log.warning(
            "state store degraded: %s; serving continues WITHOUT durability (no journal for Resume, "
            "registry and prefix index not saved); reconnecting every %gs",
            self._detail,
            self.config.reconnect_interval_s,
        )
        if not self._closed and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect(), name="splitserve-redis-reconnect"
            )

    async def _reconnect(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.reconnect_interval_s)
            try:
                await asyncio.wait_for(self._redis.ping(), self.config.op_timeout_s * 4)
            except (RedisError, OSError, TimeoutError):
                continue
            self._ok = True
            self._detail = f"redis at {_where(self.url)}"
            self._prefix_written.clear()  # rewrite every worker's set in full
            log.info("state store: reconnected to %s after outage %d", _where(self.url), self.outages)
            try:
                await self._run_reconnect_hooks()
            except Exception:  # a hook's failure must not stop the store
                log.exception("state store: a reconnect hook failed")
            return

    async def _read(self, coro: Any) -> Any:
        if not self._ok:
            coro.close()
            raise StoreUnavailable(self._detail)
        try:
            return await coro
        except (AuthenticationError, ResponseError):
            raise
        except (RedisError, OSError, TimeoutError) as e:
            self._degrade(e)
            raise StoreUnavailable(self._detail) from e

    # ------------------------------------------------------------ request journal
    def _jkey(self, key: str) -> str:
        return f"{self._p}:journal:{key}"

    def _append(self, key: str, fields: dict[str, Any], refresh: bool = False) -> list[Op]:
        """XADD to the key's stream; its TTL (and its spec's) is refreshed with it when
        ``refresh`` or when the last refresh is older than ``_ttl_refresh_s`` (so a token
        costs one command, not three, and a journal still expires between ``journal_ttl_s``
        and ``journal_ttl_s + _ttl_refresh_s`` after its last write)."""
        stream = self._jkey(key)
        ops: list[Op] = [("xadd", (stream, fields), {"maxlen": self.config.journal_max_entries, "approximate": True})]
        now = time.monotonic()
        if refresh or now - self._refreshed.get(key, -1e18) >= self._ttl_refresh_s:
            ttl = int(self.config.journal_ttl_s) or 1
            ops += [("expire", (stream, ttl), {}), ("expire", (f"{stream}:spec", ttl), {})]
            self._refreshed[key] = now
        return ops

    def _start_ops(self, spec: JournalSpec) -> list[Op]:
        self._refreshed.pop(spec.key, None)  # its first append sets the new stream's TTL
        stream = self._jkey(spec.key)
        ttl = int(self.config.journal_ttl_s) or 1
        return [
            ("delete", (stream,), {}),
            ("set", (f"{stream}:spec", json.dumps(spec.to_json())), {"ex": ttl}),
            ("zadd", (self._inflight, {spec.key: spec.created_at}), {}),
        ]

    async def journal_start(self, spec: JournalSpec) -> None:
        await self._write(self._start_ops(spec))

    async def journal_reopen(self, key: str) -> None:
        ops = self._append(key, {"k": "o"})
        ops.append(("zadd", (self._inflight, {key: time.time()}), {}))
        await self._write(ops)

    async def journal_rewrite(self, record: JournalRecord) -> None:
        key = record.spec.key
        ops = self._start_ops(record.spec)
        for route in record.routes:
            ops += self._append(key, {"k": "r", "v": json.dumps(route.to_json())})
        if record.token_ids:
            ops += self._append(key, {"k": "t", "c": 0, "v": ",".join(map(str, record.token_ids))})
        if record.end is not None:
            ops += self._finish_ops(key, record.end)
        await self._write(ops)

    async def journal_route(self, key: str, route: RouteRecord) -> None:
        await self._write(self._append(key, {"k": "r", "v": json.dumps(route.to_json())}, refresh=True))

    async def journal_tokens(self, key: str, cursor: int, token_ids: Sequence[int]) -> None:
        await self._write(self._append(key, {"k": "t", "c": cursor, "v": ",".join(map(str, token_ids))}))

    async def journal_finish(self, key: str, end: JournalEnd) -> None:
        await self._write(self._finish_ops(key, end))

    def _finish_ops(self, key: str, end: JournalEnd) -> list[Op]:
        """The end record (TTL refreshed with it), out of the in-flight set; the key leaves the
        refresh bookkeeping, which would otherwise keep one entry per finished request."""
        ops = self._append(key, {"k": "f", "v": json.dumps(end.to_json())}, refresh=True)
        self._refreshed.pop(key, None)
        ops.append(("zrem", (self._inflight, key), {}))
        return ops

    async def journal_load(self, key: str) -> JournalRecord | None:
        stream = self._jkey(key)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(f"{stream}:spec")
        pipe.xrange(stream)
        raw_spec, entries = await self._read(pipe.execute())
        if raw_spec is None:
            return None
        spec = JournalSpec.from_json(json.loads(raw_spec))
        pieces: list[tuple[int, list[int]]] = []
        routes: list[RouteRecord] = []
        end: JournalEnd | None = None
        for _, fields in entries:
            kind = fields.get("k")
            if kind == "t":
                v = fields["v"]
                pieces.append((int(fields["c"]), [int(t) for t in v.split(",")] if v else []))
            elif kind == "r":
                routes.append(RouteRecord.from_json(json.loads(fields["v"])))
            elif kind == "f":
                end = JournalEnd.from_json(json.loads(fields["v"]))
            elif kind == "o":
                end = None
        tokens, complete = assemble_tokens(pieces)
        return JournalRecord(spec, tokens, tuple(routes), end, complete)

    async def journal_in_flight(self, key: str) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zscore(self._inflight, key)
        pipe.exists(f"{self._jkey(key)}:spec")
        score, exists = await self._read(pipe.execute())
        return score is not None and bool(exists)

    async def journal_unfinished(self) -> list[str]:
        keys = await self._read(self._redis.zrange(self._inflight, 0, -1))
        if not keys:
            return []
        exists = await self._read(self._redis.mget([f"{self._jkey(k)}:spec" for k in keys]))
        gone = [k for k, e in zip(keys, exists) if e is None]
        if gone:  # expired without an end (their process died long ago)
            await self._write([("zrem", (self._inflight, *gone), {})])
        return [k for k, e in zip(keys, exists) if e is not None]

    # ------------------------------------------------------------ worker registry
    async def heartbeat(self, workers: Sequence[WorkerRegistration]) -> None:
        if not workers:
            return
        ttl = max(1, int(round(self.config.heartbeat_ttl_s)))
        ops: list[Op] = [("sadd", (self._workers, *(w.worker_id for w in workers)), {})]
        for w in workers:
            ops.append(("set", (f"{self._p}:worker:{w.worker_id}", json.dumps(w.to_json())), {"ex": ttl}))
        await self._write(ops)

    async def deregister(self, worker_id: str) -> None:
        await self._write(
            [("delete", (f"{self._p}:worker:{worker_id}",), {}), ("srem", (self._workers, worker_id), {})]
        )

    async def live_workers(self) -> list[WorkerRegistration]:
        ids = sorted(await self._read(self._redis.smembers(self._workers)))
        if not ids:
            return []
        raw = await self._read(self._redis.mget([f"{self._p}:worker:{wid}" for wid in ids]))
        gone = [wid for wid, r in zip(ids, raw) if r is None]
        if gone:
            await self._write([("srem", (self._workers, *gone), {})])
        return [WorkerRegistration.from_json(json.loads(r)) for r in raw if r is not None]

    # ------------------------------------------------------------ prefix index
    async def prefix_replace(self, worker_id: str, hashes: frozenset[int]) -> None:
        key = f"{self._p}:prefix:{worker_id}"
        ttl = int(self.config.journal_ttl_s) or 1
        before = self._prefix_written.get(worker_id)
        if before == hashes:
            return
        ops: list[Op] = [("sadd", (self._prefix_workers, worker_id), {})]
        if before is None:  # first write from this process (or after an outage): in full
            ops.append(("delete", (key,), {}))
            added, removed = hashes, frozenset()
        else:
            added, removed = hashes - before, before - hashes
        if added:
            ops.append(("sadd", (key, *added), {}))
        if removed:
            ops.append(("srem", (key, *removed), {}))
        ops.append(("expire", (key, ttl), {}))
        self._prefix_written[worker_id] = frozenset(hashes)
        await self._write(ops)

    async def prefix_drop(self, worker_id: str) -> None:
        self._prefix_written.pop(worker_id, None)
        await self._write(
            [("delete", (f"{self._p}:prefix:{worker_id}",), {}), ("srem", (self._prefix_workers, worker_id), {})]
        )

    async def prefix_load(self) -> dict[str, frozenset[int]]:
        ids = sorted(await self._read(self._redis.smembers(self._prefix_workers)))
        out: dict[str, frozenset[int]] = {}
        for wid in ids:
            members = await self._read(self._redis.smembers(f"{self._p}:prefix:{wid}"))
            if members:
                out[wid] = frozenset(int(h) for h in members)
        return out


def _where(url: str) -> str:
    """The URL without its password (for logs and health)."""

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)
