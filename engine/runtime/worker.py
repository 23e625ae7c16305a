"""The part of every worker that is not its kind: the engine loop, the stats snapshot, the
token streams, liveness. Each worker kind composes one ``WorkerRuntime`` and derives from
``RuntimeWorker``, which answers the ``WorkerAPI`` methods every kind shares from it.

Lifecycle: the worker builds its own state, then ``WorkerRuntime(...)`` (which starts the
loop thread at once) -> requests -> ``runtime.stop()`` from the worker's ``shutdown``.
If the loop dies, every open stream fails with the error, so no caller waits forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from engine.engine import EngineCore
from engine.runtime.api import WorkerAPI
from engine.runtime.loop import EngineLoop, StatsSnapshot
from engine.runtime.streams import OutputStream
from engine.types import EngineStopped, UnknownRequest, WorkerLimits, WorkerStats

# How long ``stats()`` waits for the loop thread before answering with the report taken after
# the last step (marked stale): a load report must not wait out a long step. In-process tests
# raise it (tests/conftest.py) so a count they assert is never a stale one on a loaded machine.
STATS_WAIT_S = 0.5


class StreamRegistry:
    """Open output streams by request id; read by caller threads, written by the loop thread."""

    def __init__(self, owner: str):
        self._owner = owner
        self._streams: dict[str, OutputStream] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str) -> OutputStream:
        """A new stream; ValueError if the id already has one (ids are unique per worker)."""
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            stream = self._streams[request_id] = OutputStream()
            return stream

    def get(self, request_id: str) -> OutputStream:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            raise UnknownRequest(f"unknown request {request_id!r} on {self._owner}")
        return stream

    def find(self, request_id: str) -> OutputStream | None:
        with self._lock:
            return self._streams.get(request_id)

    def close(self, request_id: str) -> OutputStream | None:
        """Forget the stream (its reader got the end, or nobody will read it)."""
        with self._lock:
            return self._streams.pop(request_id, None)

    def fail_all(self, error: str) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.fail(error)


class WorkerRuntime:
    """Loop thread + stats snapshot + streams of one worker (see the module docstring)."""

    def __init__(
        self,
        engine: EngineCore,
        worker_id: str,
        step: Callable[[], Any],
        tick: Callable[[], Any],
        compute_stats: Callable[[], WorkerStats],
        has_work: Callable[[], bool] | None = None,
    ):
        """``has_work``: when the loop steps; None: ``engine.has_work`` (an EP rank passes
        its LockstepStepper's, which keeps it stepping while its group runs)."""
        self.worker_id = worker_id
        self.started_at = time.time()  # identifies this incarnation in stats (counters restart)
        self.streams = StreamRegistry(worker_id)
        self.loop = EngineLoop(step, has_work or engine.has_work, tick, name=worker_id, on_crash=self._fail_all)
        self.snapshot = StatsSnapshot(self.loop, compute_stats)  # the worker refreshes it after each step
        self.stats_wait_s = STATS_WAIT_S  # stats() waits this long for the loop before answering stale
        self.loop.start()

    def ping(self) -> str:
        if self.loop.error is not None:
            raise EngineStopped(f"{self.worker_id}: engine loop stopped: {self.loop.error!r}")
        return self.worker_id

    def stats(self) -> WorkerStats:
        return self.snapshot.get(self.stats_wait_s)

    def stop(self) -> None:
        self.loop.stop()

    def _fail_all(self, error: BaseException) -> None:
        """The engine loop died: every open stream ends now with the error (no caller hangs)."""
        self.streams.fail_all(f"{self.worker_id} engine failed: {error!r}")


class RuntimeWorker(WorkerAPI):
    """``WorkerAPI`` answered from ``self.runtime`` and ``self.engine`` (set by the subclass)."""

    engine: EngineCore
    runtime: WorkerRuntime

    @property
    def worker_id(self) -> str:
        return self.runtime.worker_id

    @property
    def loop(self) -> EngineLoop:
        return self.runtime.loop

    def ping(self) -> str:
        return self.runtime.ping()

    def stats(self) -> WorkerStats:
        """Computed between engine steps; if a long step keeps the loop busy past
        ``runtime.stats_wait_s``, the report taken after the last step (marked ``stale``)."""
        return self.runtime.stats()

    def limits(self) -> WorkerLimits:
        return self.engine.limits()

    def node_id(self) -> str:
        return "local"
