"""Forming torch.distributed groups between workers (Ray actors or in-process objects): TP ranks,
EP groups, model <-> attention workers. One helper for all of them.

The driver side of engine/runtime/groups.py. Each member is anything implementing
``GroupMember`` (the worker handles do, or a test's stand-in); the member process does the
joining itself (``engine.runtime.groups.join_group``) and keeps the group.

    form_group("tp/decode-0", members, backend="gloo", timeout_s=10)
      1. every member's node_ip()                    (concurrently)
      2. members[0].free_port()                      rank 0 hosts the store on its node
      3. one GroupSpec per rank (rank = position in members, host/port = rank 0's)
      4. every member's join_group(spec)             concurrently: a rank joining alone would
                                                     wait for the others until its timeout
Each step waits for all members, at most ``timeout_s`` (+ ``grace_s`` for the join, whose
ranks fail on their own after timeout_s). Any failure raises GroupFormationError naming every
member that failed and why; members that joined keep a group that will never be used (their
owner discards them or forms the group again).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cluster.config import PoolConfig
from engine.runtime.groups import BACKENDS, GroupBackend, GroupSpec

T = TypeVar("T")


def group_backend(pools: Sequence[PoolConfig]) -> GroupBackend:
    """The backend of a group whose members come from ``pools``: the first explicit
    ``group_transport`` among them (PoolConfig validated it), else, all "auto", NCCL if any
    pool has GPUs, else gloo."""
    for pool in pools:
        if pool.group_transport != "auto":
            assert pool.group_transport in BACKENDS, pool.group_transport
            return pool.group_transport  # type: ignore[return-value]  # one of BACKENDS, checked above
    return "nccl" if any(p.num_gpus > 0 for p in pools) else "gloo"


class GroupMember(Protocol):
    """What form_group needs of a worker. ``join_group`` blocks (in the member) until every rank
    joined, and raises if its rank could not join."""

    worker_id: str

    async def node_ip(self) -> str: ...  # the address peers reach this member's node at

    async def free_port(self) -> int: ...  # a TCP port free on that node now (engine.runtime.groups.free_port)

    async def join_group(self, spec: GroupSpec) -> None: ...


@dataclass(frozen=True)
class MemberFailure:
    worker_id: str
    rank: int
    step: str  # "node_ip", "free_port" or "join_group"
    cause: str  # the exception, or "no answer within N s"
    answered: bool  # False: the call had not returned at the deadline (hung or unreachable)


class GroupFormationError(RuntimeError):
    def __init__(self, name: str, failures: Sequence[MemberFailure]):
        self.name = name
        self.failures = tuple(failures)
        lines = "; ".join(f"{f.worker_id} (rank {f.rank}) {f.step}: {f.cause}" for f in self.failures)
        super().__init__(f"group {name!r} did not form: {lines}")

    @property
    def failed_members(self) -> tuple[str, ...]:
        return tuple(f.worker_id for f in self.failures)


async def form_group(
    name: str,
    members: Sequence[GroupMember],
    *,
    backend: GroupBackend,
    timeout_s: float,
    grace_s: float = 5.0,
) -> list[GroupSpec]:
    """Forms group ``name`` over ``members`` (rank i = members[i]); returns the specs the ranks
    joined with. Raises GroupFormationError (naming the members that failed) within about
    3 x timeout_s + grace_s, ValueError for bad arguments."""
    if not members:
        raise ValueError(f"group {name!r}: no members")
    ids = [m.worker_id for m in members]
    if len(set(ids)) != len(ids):
        raise ValueError(f"group {name!r}: duplicate members in {ids}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    if not (grace_s >= 0 and math.isfinite(grace_s)):
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    ips = await _all_members(name, "node_ip", members, lambda m: m.node_ip(), timeout_s)
    (port,) = await _all_members(name, "free_port", members[:1], lambda m: m.free_port(), timeout_s)
    specs = [
        GroupSpec(name, rank, len(members), ips[0], port, backend, timeout_s, local_host=ips[rank])
        for rank in range(len(members))
    ]  # validates the port before any member is asked to join
    by_member = dict(zip(ids, specs, strict=True))
    await _all_members(name, "join_group", members, lambda m: m.join_group(by_member[m.worker_id]), timeout_s + grace_s)
    return specs


async def _all_members(
    name: str,
    step: str,
    members: Sequence[GroupMember],
    call: Callable[[GroupMember], Awaitable[T]],
    timeout_s: float,
) -> list[T]:
    """Runs call(member) for every member at once and waits for all of them, at most
    ``timeout_s``; results in member order, or GroupFormationError naming every failure
    (unanswered members first, then failures in the order they happened)."""

    failed_in_order: list[int] = []

    async def run(i: int, m: GroupMember) -> T:
        try:
            return await call(m)
        except Exception:
            failed_in_order.append(i)
            raise

    tasks = [asyncio.ensure_future(run(i, m)) for i, m in enumerate(members)]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()  # stops waiting here; a call already running in the member runs on
    failures = [
        MemberFailure(members[i].worker_id, i, step, f"no answer within {timeout_s:g} s", answered=False)
        for i, t in enumerate(tasks)
        if t in pending
    ]
    failures += [
        MemberFailure(members[i].worker_id, i, step, _summary(tasks[i].exception()), answered=True)
        for i in failed_in_order
    ]
    if failures:
        raise GroupFormationError(name, failures)
    return [t.result() for t in tasks]


def _summary(e: BaseException | None) -> str:
    """Type and last line of an exception (a Ray task error carries the remote traceback first)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1].strip() if lines else ''}"[:500]
