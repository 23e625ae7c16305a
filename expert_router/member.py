"""EPMember: one worker's membership in an expert-parallel group, shared by the decode (and
mixed) worker and the prefill worker.

The worker's engine was built for one rank by ``expert_router.group.build_ep_engine`` (its
``EPDispatcher``, not connected yet). The worker's loop runs ``member.step`` with
``member.has_work``; the member wraps the worker's own step in a ``LockstepStepper``, so every
loop iteration is one group round and a rank without requests still serves its experts while
any rank has work.

Lifecycle (``connected`` / ``closing`` / ``stopped``):

    built          has_work() False: the loop idles, nothing is routed here yet
    join(spec)     the group communicator joined (join_communicator, any backend); the
                   dispatcher connected: the loop steps in lock-step from its next iteration
    step()         one group iteration; a group stopped by ANOTHER rank's shutdown raises
                   EngineStopped (the loop crashes loudly, the controller replaces the group)
    stop()         this worker shuts down: it asks the group to stop together (no rank is left
                   in a collective) and waits for that, at most the group's timeout + 1 s
    close()        after the loop stopped: the communicator is closed

A peer that dies fails this rank's next collective within the group's timeout
(CommunicationError out of ``step``): the loop crashes and every stream fails with "engine
failed"; the router fails the requests over.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.parallel import Communicator
from engine.runtime.groups import GroupSpec, join_communicator
from engine.types import EngineStopped, ExpertCacheReport, ExpertParallelReport
from expert_router.dispatcher import EPDispatcher, LockstepStepper


class EPMember:
    def __init__(
        self, worker_id: str, dispatcher: EPDispatcher, step: Callable[[], object], has_work: Callable[[], bool]
    ):
        """``step`` / ``has_work``: the worker's own step (steps its engine, publishes its
        results) and its engine's has_work, as the loop would call them without EP."""
        self.worker_id = worker_id
        self.dispatcher = dispatcher
        self.stepper = LockstepStepper(step, has_work, dispatcher)
        self.closing = False
        self._timeout_s = 0.0  # the group's collective timeout, set by join
        self._comm: Communicator | None = None

    def join(self, spec: GroupSpec) -> None:
        """Join the EP group as this worker's rank (``spec`` naming another rank or size is a
        ValueError: the controller's rank order and the engine's shard disagree)."""
        d = self.dispatcher
        if spec.rank != d.rank or spec.world_size != d.world_size:
            raise ValueError(
                f"{self.worker_id} is EP rank {d.rank} of {d.world_size}, "
                f"asked to join as rank {spec.rank} of {spec.world_size}"
            )
        self._comm = join_communicator(spec)
        self._timeout_s = spec.timeout_s
        d.connect(self._comm)  # the loop starts stepping in lock-step from here

    def has_work(self) -> bool:
        """A rank steps once its group formed, until the group stopped for its own shutdown."""
        if not self.dispatcher.connected:
            return False
        return not (self.closing and self.stepper.stopped)

    def step(self) -> None:
        """One lock-step iteration of the group (LockstepStepper.step)."""
        if self.stepper.stopped and not self.closing:
            raise EngineStopped(f"{self.worker_id}: its expert-parallel group stopped (a peer shut down)")
        self.stepper.step()

    def stop(self, loop_error: Callable[[], BaseException | None]) -> None:
        """Shutdown, from any thread but the loop's: the group stops together (no rank left
        waiting in a collective); a peer already gone fails the last round within the group's
        timeout instead. ``loop_error``: the loop's error, if it crashed (then nothing waits)."""
        self.closing = True
        if not self.dispatcher.connected:
            return
        self.stepper.request_stop()
        deadline = time.monotonic() + self._timeout_s + 1.0
        while not self.stepper.stopped and loop_error() is None and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Close the group's communicator (after the worker's loop stopped: its last op is done)."""
        if self._comm is not None:
            self._comm.close()

    def report(self) -> ExpertParallelReport:
        d = self.dispatcher
        st = d.stats
        return ExpertParallelReport(
            rank=d.rank,
            world_size=d.world_size,
            connected=d.connected,
            rounds=st.rounds,
            tokens=st.tokens,
            local_tokens=st.local_tokens,
            remote_pairs=st.remote_pairs,
            dispatch_bytes=st.dispatch_bytes,
            combine_bytes=st.combine_bytes,
            comm_seconds=st.comm_s,
            cache=self._cache_report(),
        )

    def _cache_report(self) -> ExpertCacheReport | None:
        """The fast tier's counters (zeros until the first MoE round builds it); None without one."""
        d = self.dispatcher
        if d.cache is None:
            return None
        tiers = d.tiers
        cs = tiers.core.stats if tiers is not None else None
        return ExpertCacheReport(
            slots=d.cache.slots,
            hits=cs.hits if cs else 0,
            misses=cs.misses if cs else 0,
            prefetches=cs.prefetches if cs else 0,
            prefetch_used=cs.prefetch_used if cs else 0,
            evictions=cs.evictions if cs else 0,
            load_bytes=tiers.load_bytes if tiers else 0,
            load_seconds=tiers.modelled_load_s if tiers else 0.0,
            copy_seconds=tiers.copy_s if tiers else 0.0,
        )
