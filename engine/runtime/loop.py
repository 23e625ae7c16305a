"""EngineLoop: one thread owns an engine; other threads hand it work between steps.

Lifecycle: ``start()`` -> the thread repeats [run queued calls, ``tick()``, ``step()`` while
``has_work()``] -> ``stop()``. Every touch of the engine happens on the loop thread, so the
engine needs no locks. ``call(fn)`` queues ``fn`` and returns a Future with its result.
When idle the thread sleeps on a condition until a call arrives or ``idle_poll_s`` passes
(``tick`` polls things outside the engine, e.g. KV transfers, so it runs on that period).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from engine.types import EngineStopped, WorkerStats

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self,
        step: Callable[[], Any],
        has_work: Callable[[], bool],
        tick: Callable[[], Any] | None = None,
        name: str = "engine-loop",
        idle_poll_s: float = 0.01,
        on_crash: Callable[[BaseException], Any] | None = None,
    ):
        self._step, self._has_work, self._tick = step, has_work, tick
        self._on_crash = on_crash  # runs on the loop thread after a crash (fail waiting callers)
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._woken = False  # wake() since the last idle wait began (under _cv)
        self.idle_poll_s = idle_poll_s
        self.error: BaseException | None = None  # a step that raised stops the loop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the loop thread before its next step."""
        fut: Future = Future()
        with self._cv:
            if self._stopping or self.error is not None:
                fut.set_exception(EngineStopped(f"engine loop stopped: {self.error!r}"))
                return fut
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def wake(self) -> None:
        """End an idle wait now (any thread): something ``tick`` polls has changed, e.g. a KV
        transfer finished, and should not wait out ``idle_poll_s``."""
        with self._cv:
            self._woken = True  # seen by the loop even if it is not waiting yet (no lost wake-up)
            self._cv.notify()

    def run(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """``call(fn)`` and wait for its result."""
        return self.call(fn).result(timeout)

    def run_or(self, fn: Callable[[], Any], wait_s: float, fallback: Callable[[], Any]) -> Any:
        """``run(fn)`` if the loop gets to it within ``wait_s``; else ``fallback()`` (e.g. a
        snapshot) while a long step keeps it busy. ``fn`` still runs when the loop is free."""
        fut = self.call(fn)
        try:
            return fut.result(wait_s)
        except FutureTimeout:
            return fallback()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            with self._cv:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # the caller sees it; the loop goes on
                    fut.set_exception(e)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain()
                if self._tick is not None:
                    self._tick()
                if self._has_work():
                    self._step()
                    continue
                with self._cv:
                    if not self._calls and not self._stopping and not self._woken:
                        self._cv.wait(self.idle_poll_s)
                    self._woken = False
        except BaseException as e:
            log.exception("engine loop crashed")
            self.error = e
            if self._on_crash is not None:
                self._on_crash(e)
        finally:
            with self._cv:
                pending = list(self._calls)
                self._calls.clear()
            for _, fut in pending:
                fut.set_exception(EngineStopped(f"engine loop stopped: {self.error!r}"))


class StatsSnapshot:
    """A worker's ``stats()`` answer: computed on the loop between steps or, while a long step
    keeps the loop busy past ``wait_s``, the report taken after the last step, marked
    ``stale``. ``refresh()`` runs on the loop thread (after each step); ``get()`` from any
    thread. The report is replaced, never mutated, so readers need no lock."""

    def __init__(self, loop: EngineLoop, compute: Callable[[], WorkerStats]):
        self._loop, self._compute = loop, compute
        self._last: WorkerStats | None = None

    def refresh(self) -> WorkerStats:
        self._last = self._compute()
        return self._last

    def get(self, wait_s: float) -> WorkerStats:
        return self._loop.run_or(self.refresh, wait_s, self._stale)

    def _stale(self) -> WorkerStats:
        last = self._last
        return dataclasses.replace(last, stale=True) if last is not None else self._loop.run(self.refresh)
