"""Typed async handles over workers: a plain object in this process, or a Ray actor.

The router and controller never call a worker method by name. Each worker kind's API
(``PrefillAPI``, ``DecodeAPI``: ABCs the worker and its actor shell both implement) has a
handle class here that mirrors it method for method as ``async def``; each method passes
the API's own function object (``DecodeAPI.read``) to an ``Invoker``, which runs it on the
worker: in a thread for a local object, as an actor call for Ray.
``tests/unit/cluster/test_handles.py`` checks that every API method has a handle method
with the same parameters.

Errors are typed: ``WorkerUnavailable`` when the worker cannot serve (its actor died, or
its engine loop stopped: ``EngineStopped``); every other exception the worker raises
(ValueError for a refused request, queue.Full at the worker's bound, UnknownRequest, ...)
reaches the caller unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from attention_offload.api import AttentionAPI, AttentionWorkerStats
from cluster.control.errors import one_line
from decode_worker.api import DecodeAPI
from engine.runtime.api import GroupMemberAPI, WorkerAPI
from engine.runtime.groups import GroupSpec
from engine.runtime.tp_follower import TPFollowerAPI, TPFollowerStats, WireCall
from engine.types import (
    EngineStopped,
    FirstToken,
    KVAddress,
    RequestSpec,
    StreamChunk,
    WorkerLimits,
    WorkerStats,
)
from prefill_worker.api import PrefillAPI

T = TypeVar("T")


class WorkerUnavailable(RuntimeError):
    """The worker cannot serve: its actor is gone or its engine loop stopped."""

    def __init__(self, worker_id: str, cause: BaseException | str):
        super().__init__(f"worker {worker_id} unavailable: {one_line(cause)}")
        self.worker_id = worker_id


class Invoker(Protocol):
    """Runs one API method on one worker; ``fn`` is the API's function (e.g. ``DecodeAPI.read``)."""

    async def invoke(self, fn: Callable[..., T], *args: Any) -> T: ...


class LocalInvoker:
    """A plain worker object in this process; its methods block, so they run in a thread."""

    def __init__(self, worker_id: str, obj: WorkerAPI):
        self.worker_id = worker_id
        self.obj = obj

    async def invoke(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(getattr(self.obj, fn.__name__), *args)
        except EngineStopped as e:
            raise WorkerUnavailable(self.worker_id, e) from e


class RayInvoker:
    """A Ray actor whose class implements the API; awaits the call's ObjectRef."""

    def __init__(self, worker_id: str, actor: Any):
        self.worker_id = worker_id
        self.actor = actor

    async def invoke(self, fn: Callable[..., T], *args: Any) -> T:
        import ray

        try:
            return await getattr(self.actor, fn.__name__).remote(*args)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise WorkerUnavailable(self.worker_id, e) from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, EngineStopped):
                raise WorkerUnavailable(self.worker_id, cause) from e
            raise cause from e


class WorkerHandle:
    """The methods of ``WorkerAPI``, async. Subclasses add their kind's methods."""

    api: type[WorkerAPI] = WorkerAPI

    def __init__(self, worker_id: str, invoker: Invoker):
        self.worker_id = worker_id
        self.invoker = invoker

    async def ping(self) -> str:
        return await self.invoker.invoke(WorkerAPI.ping)

    async def stats(self) -> WorkerStats:
        return await self.invoker.invoke(WorkerAPI.stats)

    async def limits(self) -> WorkerLimits:
        return await self.invoker.invoke(WorkerAPI.limits)

    async def node_id(self) -> str:
        return await self.invoker.invoke(WorkerAPI.node_id)

    async def shutdown(self) -> None:
        return await self.invoker.invoke(WorkerAPI.shutdown)


class GroupMemberHandle:
    """The methods of ``GroupMemberAPI``, async: what ``form_group`` calls on a member (the
    cluster's GroupMember protocol). Mixed into the handles of the kinds that join groups."""

    invoker: Invoker

    async def node_ip(self) -> str:
        return await self.invoker.invoke(GroupMemberAPI.node_ip)

    async def free_port(self) -> int:
        return await self.invoker.invoke(GroupMemberAPI.free_port)

    async def join_group(self, spec: GroupSpec) -> None:
        return await self.invoker.invoke(GroupMemberAPI.join_group, spec)


class PrefillHandle(WorkerHandle, GroupMemberHandle):
    api = PrefillAPI

    async def prefill(
        self, spec: RequestSpec, decode_address: KVAddress, timeout: float | None = None, emitted: tuple[int, ...] = ()
    ) -> StreamChunk:
        return await self.invoker.invoke(PrefillAPI.prefill, spec, decode_address, timeout, emitted)

    async def abort(self, request_id: str) -> None:
        return await self.invoker.invoke(PrefillAPI.abort, request_id)


class DecodeHandle(WorkerHandle, GroupMemberHandle):
    api = DecodeAPI

    async def kv_address(self) -> KVAddress:
        return await self.invoker.invoke(DecodeAPI.kv_address)

    async def start_transfer(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> KVAddress | None:
        return await self.invoker.invoke(DecodeAPI.start_transfer, spec, emitted)

    async def set_first_token(self, request_id: str, first: FirstToken) -> None:
        return await self.invoker.invoke(DecodeAPI.set_first_token, request_id, first)

    async def generate_local(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> None:
        return await self.invoker.invoke(DecodeAPI.generate_local, spec, emitted)

    async def read(self, request_id: str, cursor: int = 0, timeout: float | None = 1.0) -> StreamChunk:
        return await self.invoker.invoke(DecodeAPI.read, request_id, cursor, timeout)

    async def abort(self, request_id: str, reason: str = "aborted") -> None:
        return await self.invoker.invoke(DecodeAPI.abort, request_id, reason)

    async def set_speculation_pressure(self, pressure: float) -> None:
        return await self.invoker.invoke(DecodeAPI.set_speculation_pressure, pressure)


class AttentionHandle(GroupMemberHandle):
    """An attention worker (attention_offload/api.py): not routed to, only grouped and watched."""

    api = AttentionAPI

    def __init__(self, worker_id: str, invoker: Invoker):
        self.worker_id = worker_id
        self.invoker = invoker

    async def ping(self) -> str:
        return await self.invoker.invoke(AttentionAPI.ping)

    async def stats(self) -> AttentionWorkerStats:
        return await self.invoker.invoke(AttentionAPI.stats)

    async def node_id(self) -> str:
        return await self.invoker.invoke(AttentionAPI.node_id)

    async def shutdown(self) -> None:
        return await self.invoker.invoke(AttentionAPI.shutdown)


class TPFollowerHandle(GroupMemberHandle):
    """A tensor-parallel follower rank (engine/runtime/tp_follower.py): not routed to; grouped with
    its rank 0, watched and shut down with it. Rank 0 itself talks to it directly."""

    api = TPFollowerAPI

    def __init__(self, worker_id: str, invoker: Invoker):
        self.worker_id = worker_id
        self.invoker = invoker

    async def ping(self) -> str:
        return await self.invoker.invoke(TPFollowerAPI.ping)

    async def stats(self) -> TPFollowerStats:
        return await self.invoker.invoke(TPFollowerAPI.stats)

    async def node_id(self) -> str:
        return await self.invoker.invoke(TPFollowerAPI.node_id)

    async def submit(self, seq: int, call: WireCall) -> None:
        return await self.invoker.invoke(TPFollowerAPI.submit, seq, call)

    async def check(self) -> str | None:
        return await self.invoker.invoke(TPFollowerAPI.check)

    async def shutdown(self) -> None:
        return await self.invoker.invoke(TPFollowerAPI.shutdown)


def local_attention(worker_id: str, worker: AttentionAPI) -> AttentionHandle:
    return AttentionHandle(worker_id, LocalInvoker(worker_id, worker))  # type: ignore[arg-type]


def local_prefill(worker_id: str, worker: PrefillAPI) -> PrefillHandle:
    return PrefillHandle(worker_id, LocalInvoker(worker_id, worker))


def local_decode(worker_id: str, worker: DecodeAPI) -> DecodeHandle:
    return DecodeHandle(worker_id, LocalInvoker(worker_id, worker))
