"""A tensor-parallel decode/mixed worker in one process: N EngineCore shards, one routed worker.

Design (issue 15, pool side): rank 0 is the routed DecodeWorker; its engine is a
``TPLeaderEngine`` wrapping rank 0's ``EngineCore(tensor_parallel=comm)``. Ranks 1..N-1 are
``TPFollower``s, each an EngineCore shard driven by its own thread. The SPMD invariant
(engine/engine.py: every rank gets the same calls in the same order) is kept by the leader:
every engine call that changes state (add_request, abort, reserve, admit, release, pin, unpin,
step) is sent to every follower as a typed ``EngineCall`` before (step) or after (the others,
only when rank 0's call succeeded) rank 0 runs it. Calls come from rank 0's loop thread only,
so the order is the loop's order; a follower applies its queue in that order. Reads (stats,
limits, has_work, layout, ...) are rank 0's: every rank's state is the same.

A step is the only call with collectives: the leader enqueues ``Step`` then steps itself, so
both ranks issue the same all-reduces at once. A follower that fails (or a dead peer) fails
rank 0's collective within the group's timeout (engine/parallel.TorchDistCommunicator): rank
0's loop then fails the worker, which the cluster replaces whole (every rank, a new group).
Rank 0 names a follower's failure when it can: before each step it checks every follower
(``TPFollowerLink.failure``, non-blocking), and when its own step fails it asks them (briefly)
why, raising ``TPFollowerFailed`` with the follower's error chained to its own.

Followers are ``TPFollowerLink``s: ``TPFollower`` (a thread in this process) or
decode_worker/tp_follower.RemoteFollower (a follower rank in another process, a Ray actor).

Lifecycle: ``build_tp_decode_worker`` joins the group ``tp/<worker id>`` (gloo, one thread
per rank), builds the N shards concurrently, starts the followers and returns the worker
with its followers; ``stop_followers`` after the worker's shutdown ends the follower threads.

Scope: ``build_tp_decode_worker`` is the in-process form (LocalCluster); on Ray each rank is an
actor (decode_worker/actor.py). No KV receiver (KV transfer between TP degrees is not
built: a TP pool prefills its own prompts). Not with EP, attention offload or speculation
(EngineCore refuses them with tensor_parallel).
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from decode_worker.worker import DecodeWorker
from engine.engine import EngineCore, StepResult
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.parallel import CommunicationError, TorchDistCommunicator
from engine.request import Request
from engine.runtime.groups import GroupSpec, free_port, join_group
from engine.spec.speculator import SpecStats
from engine.tokenizer import load_tokenizer
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
    pass


@dataclass(frozen=True)
class Stop:
    pass


EngineCall = AddRequest | Abort | Reserve | Admit | Release | Pin | Unpin | Step | Stop


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
        case Step():
            engine.step()
        case _:
            raise TypeError(f"not an engine call: {call!r}")


class TPFollowerFailed(RuntimeError):
    """A follower rank failed (its engine call raised, or it is gone): the TP worker is broken."""


class TPFollowerLink(Protocol):
    """What rank 0 needs of one follower rank. ``submit`` returns at once (never waits for the
    call to run) and the follower applies the calls in submission order; the call is the
    follower's own (nothing in it is shared with rank 0's state). ``failure`` says why the
    follower failed, or None while it is fine: with ``wait_s`` 0 from what is known here (never
    blocks), with ``wait_s`` > 0 it may ask the follower, for at most that long."""

    name: str

    def submit(self, call: EngineCall) -> None: ...

    def failure(self, wait_s: float = 0.0) -> str | None: ...


class TPFollower:
    """Rank r > 0: applies rank 0's calls in order on its shard, in its own thread.

    Lifecycle: started at construction -> ``submit`` from rank 0's loop thread -> ``stop``
    (a Stop call; the thread ends after the calls before it). A call that raises ends the
    thread with ``error`` set; rank 0 notices at its next step (the collective times out)."""

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
    """Rank 0's EngineCore, seen by the DecodeWorker: state-changing calls are replayed on the
    followers (module docstring); everything else is rank 0's core."""

    # how long a failed step waits for each follower to say why (its error, or that it is gone)
    DIAGNOSE_S = 2.0

    def __init__(self, core: EngineCore, followers: list[TPFollowerLink]):
        self.core = core
        self.followers = followers
        self.config = core.config
        self.layout = core.layout  # rank 0's: its own KV heads

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

    def set_cluster_pressure(self, pressure: float) -> None:
        self.core.set_cluster_pressure(pressure)  # a TP engine does not speculate: a no-op there

    # ---------------------------------------------------------------- writes: replayed

    def _send(self, make: Any) -> None:
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
        if layer_hook is not None:
            raise ValueError("a tensor-parallel worker's step takes no layer hook")
        failed = [f for f in (f.failure() for f in self.followers) if f is not None]
        if failed:  # a collective now would only time out: fail the worker with the cause
            raise TPFollowerFailed("; ".join(failed))
        self._send(Step)  # first: the followers' collectives meet rank 0's
        try:
            return self.core.step()
        except CommunicationError as e:
            failed = [f for f in (f.failure(self.DIAGNOSE_S) for f in self.followers) if f is not None]
            if failed:
                raise TPFollowerFailed(f"{'; '.join(failed)} (rank 0: {e})") from e
            raise


@dataclass
class TPWorker:
    """What ``build_tp_decode_worker`` returns: the routed worker and its follower ranks."""

    worker: DecodeWorker
    followers: list[TPFollower]

    def stop_followers(self, timeout_s: float = 10.0) -> None:
        for f in self.followers:
            f.stop(timeout_s)


def build_tp_decode_worker(
    model: str,
    engine_options: dict[str, Any] | None,
    world_size: int,
    worker_id: str,
    role: str = "decode",
    max_pending: int = 512,
    group_timeout_s: float = 30.0,
    host: str = "127.0.0.1",
) -> TPWorker:
    """N = ``world_size`` shards in this process over the gloo group ``tp/<worker_id>`` (module
    docstring). Raises GroupJoinError if a rank cannot join, TPDivisibilityError (ValueError)
    for a degree the model cannot take."""
    if world_size < 2:
        raise ValueError(f"a tensor-parallel worker has >= 2 ranks, got {world_size}")
    model = resolve_model_path(model)
    opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
    skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
    config = build_engine_config(model, **opts, mode="decode_only")
    port = free_port(host)
    name = f"tp/{worker_id}"
    engines: list[EngineCore | None] = [None] * world_size
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            spec = GroupSpec(name, rank, world_size, host, port, "gloo", group_timeout_s, local_host=host)
            comm = TorchDistCommunicator(join_group(spec), timeout_s=group_timeout_s, name=name)
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
    cores = [e for e in engines if e is not None]
    followers = [TPFollower(cores[r], f"{name}#{r}") for r in range(1, world_size)]
    worker = DecodeWorker(
        TPLeaderEngine(cores[0], followers),  # type: ignore[arg-type]  # an EngineCore to the worker
        None,
        tokenizer=load_tokenizer(model, skip_tokenizer_init),
        worker_id=worker_id,
        role=role,
        max_pending=max_pending,
    )
    return TPWorker(worker, followers)
