"""An asyncio event loop on a background thread, for tests that drive async servers (the
frontends, a LocalCluster) from synchronous clients (the gRPC SDK, httpx)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class LoopThread:
    """Lifecycle: created running -> ``run``/``call`` any number of times -> ``close``."""

    def __init__(self, name: str = "test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call plain ``fn(*args)`` on the loop thread (state owned by the loop)."""

        async def on_loop() -> Any:
            return fn(*args)

        return self.run(on_loop())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
