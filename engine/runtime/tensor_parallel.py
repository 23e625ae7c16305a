"""A tensor-parallel engine in one process: N EngineCore shards driven as one (every worker kind).

Rank 0's ``EngineCore(tensor_parallel=comm)`` is wrapped by a ``TPLeaderEngine``, the engine
its worker (a DecodeWorker, decode_worker/tensor_parallel.py, or a PrefillWorker,
prefill_worker/tensor_parallel.py) drives. Ranks 1..N-1 are ``TPFollower``s, each an
EngineCore shard driven by its own thread. The SPMD invariant (engine/engine.py: every rank
gets the same calls in the same order) is kept by the leader: every engine call that changes
state (add_request, abort, reserve, admit, release, pin, unpin, step) is sent to every
follower as a typed ``EngineCall`` before (step) or after (the others, only when rank 0's
call succeeded) rank 0 runs it. Calls come from rank 0's loop thread, so the order is the
loop's order; a follower applies its queue in that order. Reads (stats, limits, has_work,
layout, ...) are rank 0's: every rank's state is the same.

KV pages between TP degrees (issue 15): the workers exchange whole-head pages (KVLayout
``whole()``), so the cut happens at the TP worker's edge, in two more calls:

- ``WriteKV(layer, block_ids, pages)``: rank r's slice of pages a decode worker received
  whole (decode_worker/tp_kv_receiver.py); the follower writes it into its cache. It is the
  one call not sent from rank 0's loop thread (the KV receiver's transport thread sends it,
  under the receiver's lock); its order against the others still holds, see that module.
- ``GatherKV(block_ids)``: a TP prefill's all-gather of pages, every layer, over the TP group
  (``gather_kv``); a collective, so like ``Step`` it is sent before rank 0 runs it, from its
  loop thread, right after the step that wrote the pages (a finished prompt's in whole-cache
  mode; in layer-wise mode only pages a step's in-step gather lacks, e.g. a preempted
  request's resent from page 0): no later step can have changed them.

A step and a gather are the only calls with collectives: the leader enqueues them then runs
them itself, so every rank issues the same collectives in the same order. A follower that
fails (or a dead peer) fails rank 0's collective within the group's timeout
(engine/parallel.TorchDistCommunicator): rank 0's loop then fails the worker, which the
cluster replaces whole (every rank, a new group). Rank 0 names a follower's failure when it
can: before each step it checks every follower (``TPFollowerLink.failure``, non-blocking), and
when its own step fails it asks them (briefly) why, raising ``TPFollowerFailed`` with the
follower's error chained to its own.

Followers are ``TPFollowerLink``s: ``TPFollower`` (a thread in this process) or a follower
rank in another process (engine/runtime/tp_follower.RemoteFollower, a Ray actor). Every call
is a frozen dataclass of plain values and torch tensors, so it can cross a process boundary.

Layer hooks (a prefill worker's layer-wise KV push): a TP step cannot run a hook between
layers (the hook's gathers would interleave with the step's collectives on rank 0 only), so
``TPLeaderEngine.step(hook)`` steps every rank without one and runs the hook after the step,
layer by layer, with the step's SchedulerOutput (``StepResult.schedule``). The model path is
therefore the same as a hookless step's: a step long enough for TokenWeave gets its
token-split overlap in layer-wise mode too (a model layer hook would turn it off). The pages
the hook sends are gathered *during* that step: a hooked step is ``Step(gather_kv=True)`` on
every rank, and each rank's model starts layer l's all-gather of the step's new pages as soon
as layer l's KV is written (engine/kv_cache/step_gather.py), so the gathers overlap the
following layers' compute; the hook reads them from ``step_pages``.

Lifecycle: ``build_tp_cores`` joins the group (gloo, one thread per rank) and builds the N
shards concurrently; ``TPFollower`` starts its thread at construction and ends it at ``stop``.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from engine.config import EngineConfig
from engine.engine import EngineCore, StepResult
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.step_gather import StepKVGather, StepKVPages
from engine.parallel import CommunicationError
from engine.request import Request
from engine.runtime.groups import GroupSpec, free_port, join_communicator
from engine.spec.speculator import SpecStats
from engine.types import EngineStats, WorkerLimits


# ---------------------------------------------------------------- the calls rank 0 replays
@dataclass(frozen=True)
class AddRequest:
    request: Request  # the follower's own copy


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Reserve:
    request: Request  # the follower's own copy


@dataclass(frozen=True)
class Admit:
    request_id: str
    first_token: int


@dataclass(frozen=True)
class Release:
    request_id: str


@dataclass(frozen=True)
class Pin:
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Unpin:
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One engine step; ``gather_kv``: EngineCore.step's (the step all-gathers its new pages)."""

    gather_kv: bool = False


@dataclass(frozen=True)
class WriteKV:
    """This rank's heads of received pages: ``pages: [len(block_ids), 2, block_size, Hkv_local, D]``
    for ``layer``, written into ``block_ids`` (reserved on every rank alike: same pool state)."""

    layer: int
    block_ids: tuple[int, ...]
    pages: torch.Tensor  # the follower's own copy


@dataclass(frozen=True)
class GatherKV:
    """All-gather blocks ``block_ids`` of every layer over the TP group (``gather_kv``)."""

    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Stop:
    pass


EngineCall = AddRequest | Abort | Reserve | Admit | Release | Pin | Unpin | Step | WriteKV | GatherKV | Stop


def gather_kv(engine: EngineCore, block_ids: list[int]) -> StepKVPages:
    """Every rank's heads of blocks ``block_ids``, every layer, gathered over the engine's TP
    group in one all-gather (a collective: every rank calls it, same blocks, same order): the
    pages a step's in-step gather would have, read the same way (``StepKVPages.pages``)."""
    comm = engine.tensor_parallel
    if comm is None:
        raise ValueError("gather_kv needs a tensor-parallel engine")
    return StepKVGather(engine.cache, comm, tuple(block_ids)).finish()


def apply_call(engine: EngineCore, call: EngineCall) -> None:
    """Run ``call`` on a follower's shard (what rank 0 ran on its own)."""
    match call:
        case AddRequest(request):
            engine.add_request(request)
        case Abort(request_id):
            engine.abort(request_id)
        case Reserve(request):
            engine.reserve(request)
        case Admit(request_id, first_token):
            engine.admit(request_id, first_token)
        case Release(request_id):
            engine.release(request_id)
        case Pin(blocks):
            engine.pin(list(blocks))
        case Unpin(blocks):
            engine.unpin(list(blocks))
        case Step(gather_kv=gather):
            engine.step(gather_kv=gather)  # the gathered pages are rank 0's to send
        case WriteKV(layer, block_ids, pages):
            engine.cache.write_pages(layer, list(block_ids), pages)
        case GatherKV(block_ids):
            gather_kv(engine, list(block_ids))  # this rank's part of the collective; only rank 0 sends the pages
        case _:
            raise TypeError(f"not an engine call: {call!r}")


class TPFollowerFailed(RuntimeError):
    """A follower rank failed (its engine call raised, or it is gone): the TP worker is broken."""


class TPFollowerLink(Protocol):
    """What rank 0 needs of one follower rank. ``submit`` returns at once (never waits for the
    call to run), is safe to call from several threads (rank 0's loop, its KV receiver's
    transport thread: WriteKV) and the follower applies the calls in submission order; the
    call is the follower's own (nothing in it is shared with rank 0's state). ``failure`` says
    why the follower failed, or None while it is fine: with ``wait_s`` 0 from what is known
    here (never blocks), with ``wait_s`` > 0 it may ask the follower, for at most that long."""

    name: str

    def submit(self, call: EngineCall) -> None: ...

    def failure(self, wait_s: float = 0.0) -> str | None: ...


class TPFollower:
    """Rank r > 0: applies rank 0's calls in order on its shard, in its own thread.

    Lifecycle: started at construction -> ``submit`` from rank 0's loop thread (and WriteKV
    from its KV receiver) -> ``stop`` (a Stop call; the thread ends after the calls before
    it). A call that raises ends the thread with ``error`` set; rank 0 sees it through
    ``failure`` before its next collective (TPLeaderEngine refuses to step)."""

    def __init__(self, engine: EngineCore, name: str):
        self.engine = engine
        self.name = name
        self.error: BaseException | None = None
        self._calls: queue.SimpleQueue[EngineCall] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: EngineCall) -> None:
        self._calls.put(call)

    def failure(self, wait_s: float = 0.0) -> str | None:
        if self.error is not None:
            return f"{self.name}: {type(self.error).__name__}: {self.error}"
        return None if self._thread.is_alive() else f"{self.name}: stopped"

    def stop(self, timeout_s: float) -> None:
        self._calls.put(Stop())
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} did not stop within {timeout_s} s (a step blocked?)")

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            if isinstance(call, Stop):
                return
            try:
                apply_call(self.engine, call)
            except BaseException as e:  # noqa: BLE001 - kept for the report; rank 0's step then fails
                self.error = e
                return


class TPLeaderEngine:
    """Rank 0's EngineCore, seen by its worker: state-changing calls are replayed on the
    followers (module docstring); everything else is rank 0's core."""

    # how long a failed step waits for each follower to say why (its error, or that it is gone)
    DIAGNOSE_S = 2.0

    def __init__(self, core: EngineCore, followers: list[TPFollowerLink]):
        self.core = core
        self.followers = followers
        self.config = core.config
        self.layout = core.layout  # rank 0's: its own KV heads
        # the last hooked step's pages, gathered during it (whole heads; read by the layer hook
        # and until the next step); None after a step without a hook
        self.step_pages: StepKVPages | None = None

    # ---------------------------------------------------------------- reads: rank 0's state
    def prepare(self, req: Request) -> Request:
        return self.core.prepare(req)

    def has_work(self) -> bool:
        return self.core.has_work()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def spec_stats(self) -> SpecStats | None:
        return self.core.spec_stats()

    def limits(self) -> WorkerLimits:
        return self.core.limits()

    def cached_block_hashes(self) -> frozenset[int]:
        return self.core.cached_block_hashes()

    def block_ids(self, request_id: str) -> list[int]:
        return self.core.block_ids(request_id)

    def set_cluster_pressure(self, pressure: float) -> None:
        self.core.set_cluster_pressure(pressure)  # a TP engine does not speculate: a no-op there

    # ---------------------------------------------------------------- writes: replayed

    def _send(self, make: Callable[[], EngineCall]) -> None:
        """One call per follower, each built by ``make`` (a follower's own copy)."""
        for f in self.followers:
            f.submit(make())

    def add_request(self, req: Request) -> None:
        copies = [copy.deepcopy(req) for _ in self.followers]  # before rank 0's scheduler owns it
        self.core.add_request(req)
        for f, c in zip(self.followers, copies, strict=True):
            f.submit(AddRequest(c))

    def reserve(self, req: Request) -> list[int] | None:
        copies = [copy.deepcopy(req) for _ in self.followers]
        blocks = self.core.reserve(req)
        for f, c in zip(self.followers, copies, strict=True):
            f.submit(Reserve(c))  # a None (no room) is None on every rank: same pool state
        return blocks

    def abort(self, request_id: str) -> Request | None:
        req = self.core.abort(request_id)
        self._send(lambda: Abort(request_id))
        return req

    def admit(self, request_id: str, first_token: int) -> Request:
        req = self.core.admit(request_id, first_token)
        self._send(lambda: Admit(request_id, first_token))
        return req

    def release(self, request_id: str) -> Request:
        req = self.core.release(request_id)
        self._send(lambda: Release(request_id))
        return req

    def pin(self, blocks: list[int]) -> None:
        self.core.pin(blocks)
        self._send(lambda: Pin(tuple(blocks)))

    def unpin(self, blocks: list[int]) -> None:
        self.core.unpin(blocks)
        self._send(lambda: Unpin(tuple(blocks)))

    def step(self, layer_hook: Any = None) -> StepResult:
        """One SPMD step. ``layer_hook(layer, out)`` runs after the step, for every layer in
        order, with the step's SchedulerOutput (module docstring), before this returns; a
        hooked step also all-gathers its new pages during the step (``step_pages``)."""
        self._check_followers()
        gather = layer_hook is not None
        self._send(lambda: Step(gather))  # first: the followers' collectives meet rank 0's
        self.step_pages = None
        try:
            result = self.core.step(gather_kv=gather)
        except CommunicationError as e:
            self._diagnose(e)
            raise
        self.step_pages = result.kv_pages
        if layer_hook is not None and result.schedule is not None:
            for layer in range(self.core.layout.num_layers):
                layer_hook(layer, result.schedule)
        return result

    def gather_kv(self, block_ids: list[int]) -> StepKVPages:
        """Whole pages of ``block_ids``, every layer (``gather_kv``; a collective: the followers
        are sent GatherKV first, like a step)."""
        self._check_followers()
        self._send(lambda: GatherKV(tuple(block_ids)))
        try:
            return gather_kv(self.core, block_ids)
        except CommunicationError as e:
            self._diagnose(e)
            raise

    def _check_followers(self) -> None:
        failed = [f for f in (f.failure() for f in self.followers) if f is not None]
        if failed:  # a collective now would only time out: fail the worker with the cause
            raise TPFollowerFailed("; ".join(failed))

    def _diagnose(self, e: CommunicationError) -> None:
        """Rank 0's collective failed: raise TPFollowerFailed naming the followers that say why."""
        failed = [f for f in (f.failure(self.DIAGNOSE_S) for f in self.followers) if f is not None]
        if failed:
            raise TPFollowerFailed(f"{'; '.join(failed)} (rank 0: {e})") from e

    @property
    def whole_layout(self) -> KVLayout:
        """The layout of every rank's heads together: what this worker exchanges with others."""
        return self.core.layout.whole()


W = TypeVar("W")


@dataclass
class TPWorker(Generic[W]):
    """A tensor-parallel worker in one process: the routed worker (rank 0, whose engine is a
    TPLeaderEngine) and its follower ranks (decode_worker/ and prefill_worker/tensor_parallel.py)."""

    worker: W
    followers: list[TPFollower]

    def stop_followers(self, timeout_s: float = 10.0) -> None:
        """After the worker's shutdown (its loop stopped: no step pending), end every follower."""
        for f in self.followers:
            f.stop(timeout_s)


def build_tp_cores(
    config: EngineConfig, world_size: int, name: str, group_timeout_s: float = 30.0, host: str = "127.0.0.1"
) -> list[EngineCore]:
    """N = ``world_size`` EngineCore shards of ``config`` in this process, rank r joined to the
    gloo group ``name`` by its own thread (the joins and loads run concurrently). Raises
    GroupJoinError if a rank cannot join, TPDivisibilityError (ValueError) for a degree the
    model cannot take."""
    if world_size < 2:
        raise ValueError(f"a tensor-parallel worker has >= 2 ranks, got {world_size}")
    port = free_port(host)
    engines: list[EngineCore | None] = [None] * world_size
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            spec = GroupSpec(name, rank, world_size, host, port, "gloo", group_timeout_s, local_host=host)
            comm = join_communicator(spec)
            engines[rank] = EngineCore(config, progress=rank == 0, tensor_parallel=comm)
        except BaseException as e:  # noqa: BLE001 - re-raised below, on the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"{name}#{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [e for e in engines if e is not None]
