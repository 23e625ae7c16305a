"""Uniform async handles over workers: plain objects in-process, or Ray actors.

The router only calls ``await handle.call(method, *args)``. Both kinds raise
``WorkerUnavailable`` when the worker is gone (actor died, engine loop stopped), and let the
worker's own exceptions (e.g. ValueError for a bad request) through unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class WorkerUnavailable(RuntimeError):
    def __init__(self, worker_id: str, cause: BaseException | str):
        super().__init__(f"worker {worker_id} unavailable: {cause}")
        self.worker_id = worker_id


class WorkerHandle(Protocol):
    worker_id: str

    async def call(self, method: str, *args: Any) -> Any: ...


class LocalHandle:
    """Calls a plain worker object in a thread (its methods block)."""

    def __init__(self, worker_id: str, obj: Any):
        self.worker_id = worker_id
        self.obj = obj

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(getattr(self.obj, method), *args)
        except RuntimeError as e:
            if "engine loop stopped" in str(e):
                raise WorkerUnavailable(self.worker_id, e) from e
            raise


class RayHandle:
    """Calls a Ray actor method and awaits its ObjectRef."""

    def __init__(self, worker_id: str, actor: Any):
        self.worker_id = worker_id
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return await getattr(self.actor, method).remote(*args)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise WorkerUnavailable(self.worker_id, e) from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, RuntimeError) and "engine loop stopped" in str(cause):
                raise WorkerUnavailable(self.worker_id, cause) from e
            raise cause from e
