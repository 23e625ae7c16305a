"""WorkerAPI: the methods every worker kind offers across the worker boundary.

Each worker kind declares its API as an ABC deriving from this one (prefill_worker.api,
decode_worker.api; later attention and expert workers). The plain worker class and its Ray
actor shell both implement it, so Python refuses to build either if a method is missing,
and the control plane calls them through typed handles (cluster.control.handles) that
mirror the same methods. Arguments and results are the dataclasses of ``engine.types``.

Errors crossing the boundary are typed: ``EngineStopped`` (the worker cannot serve: the
caller treats it as unavailable), ``ValueError`` (a request the worker refuses),
``UnknownRequest``. Any method may block; handles run them off the caller's event loop.
"""

from __future__ import annotations

import abc

from engine.runtime.groups import GroupSpec
from engine.types import WorkerLimits, WorkerStats


class WorkerAPI(abc.ABC):
    @abc.abstractmethod
    def ping(self) -> str:
        """Liveness: the worker id. Raises EngineStopped if the engine loop has died."""

    @abc.abstractmethod
    def stats(self) -> WorkerStats:
        """Load and health report; answered from the last snapshot (``stale``) while a long
        engine step keeps the loop busy, so it never waits for more than a moment."""

    @abc.abstractmethod
    def limits(self) -> WorkerLimits:
        """What this worker can serve (fixed for its lifetime)."""

    @abc.abstractmethod
    def node_id(self) -> str:
        """The node the worker runs on: a Ray node id, or "local" for an in-process worker."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine loop and close transports. Idempotent."""


class GroupMemberAPI(abc.ABC):
    """What forming a group needs of a worker (cluster/control/groups.py ``form_group``, every
    rank at once): EP ranks, a model worker and its attention workers, the ranks of a
    tensor-parallel worker. Each kind's API derives from it where that kind joins groups."""

    @abc.abstractmethod
    def node_ip(self) -> str:
        """The address group peers reach this worker's node at."""

    @abc.abstractmethod
    def free_port(self) -> int:
        """A TCP port free on this worker's node now (a group's rendezvous, hosted by rank 0)."""

    @abc.abstractmethod
    def join_group(self, spec: GroupSpec) -> None:
        """Join the group ``spec`` names as ``spec.rank`` (blocks until every rank joined, at
        most ``spec.timeout_s``). ValueError on a worker that joins no group or for another
        rank than its own; GroupJoinError if it cannot join. What the worker does once joined
        is its kind's (see each API)."""
