"""A tensor-parallel follower rank in its own process, and rank 0's link to it (every worker
kind: a TP decode/mixed worker and a TP prefill worker use the same follower).

A TP worker of degree N on Ray (issue 15, pools) is N actors: rank 0 the routed DecodeActor
or PrefillActor whose engine is a ``TPLeaderEngine`` (engine/runtime/tensor_parallel.py),
ranks 1..N-1 ``TPFollowerWorker``s (their Ray shell: decode_worker/actor.TPFollowerActor),
built in rank 0's engine mode. Neither knows Ray here; the channel between them is injected
(``FollowerChannel``; ``FutureFollowerChannel`` over any RPC whose calls return futures).

Lifecycle of a follower rank::

    TPFollowerWorker(...)      loads its shard: EngineCore(config, tensor_parallel=
                               DeferredCommunicator(rank, N, device)); no collective yet
    join_group(spec)           joins tp/<worker id> (every rank at once, driven by the
                               controller's form_group) and connects the communicator
    submit(seq, call) ...      rank 0's engine calls, numbered 1, 2, 3, ... by rank 0
    shutdown()                 the apply thread ends after the calls before it

Ordering (the SPMD invariant: every rank gets the same calls in the same order): rank 0's
``RemoteFollower`` numbers every call it sends. ``submit`` may be delivered in any order and
from any thread (a threaded Ray actor does not promise submission order): it parks a call
until every lower number arrived and hands the calls, in number order, to one apply thread
(``TPFollower``). A number seen twice raises (a bug, never silently reordered).

Errors: a call that raises ends the apply thread with its error kept; every later ``submit``
raises ``TPFollowerFailed`` with it (rank 0's link sees the failed submission), ``check``
returns it (rank 0 asks when its step failed) and ``ping`` raises EngineStopped (the
controller's health check replaces the whole TP worker). Rank 0's own next collective fails
within the group's timeout anyway; these make the cause visible.

Stop strings: a request's stop-string checker holds a tokenizer, which is not sent across
processes. ``RemoteFollower`` sends the request without it plus ``StopState`` (the stop
strings and the tokens the checker was fed); the follower rebuilds the checker with its own
tokenizer (the same model's), so both ranks stop a request at the same token.
"""

from __future__ import annotations

import abc
import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.config import EngineConfig
from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.parallel import DeferredCommunicator
from engine.runtime.api import GroupMemberAPI
from engine.runtime.groups import GroupSpec, free_port, join_deferred
from engine.runtime.tensor_parallel import (
    AddRequest,
    EngineCall,
    Reserve,
    TPFollower,
    TPFollowerFailed,
    TPFollowerLink,
    TPLeaderEngine,
)
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from engine.types import EngineStopped

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- what crosses the process boundary
@dataclass(frozen=True)
class StopState:
    """A stop-string checker as data: its stop strings and the tokens it was fed so far."""

    stop: tuple[str, ...]
    fed: tuple[int, ...]


@dataclass(frozen=True)
class RemoteRequestCall:
    """An AddRequest or Reserve whose request travels without its stop checker (``stop``)."""

    call: AddRequest | Reserve
    stop: StopState | None


WireCall = EngineCall | RemoteRequestCall


def to_wire(call: EngineCall) -> WireCall:
    """``call`` as it crosses to another process: a request's stop checker becomes StopState.
    Raises TypeError for a checker that is not an IncrementalDetokenizer (it cannot be rebuilt)."""
    if not isinstance(call, AddRequest | Reserve) or call.request.stop_checker is None:
        return call
    checker = call.request.stop_checker
    if not isinstance(checker, IncrementalDetokenizer):
        raise TypeError(f"a TP follower cannot rebuild a {type(checker).__name__} stop checker")
    req = copy.copy(call.request)  # the call's request is already the follower's own copy
    req.stop_checker = None
    return RemoteRequestCall(type(call)(req), StopState(tuple(checker.stop), tuple(checker.ids)))


def from_wire(call: WireCall, tokenizer: Tokenizer | None) -> EngineCall:
    """The engine call a WireCall stands for, its stop checker rebuilt with ``tokenizer``."""
    if not isinstance(call, RemoteRequestCall):
        return call
    req = call.call.request
    if call.stop is not None:
        if tokenizer is None:
            raise ValueError(f"request {req.request_id} has stop strings but this follower has no tokenizer")
        checker = IncrementalDetokenizer(tokenizer, call.stop.stop)
        for t in call.stop.fed:
            checker.append(t)
        req.stop_checker = checker
    return call.call


# ---------------------------------------------------------------- follower side
@dataclass(frozen=True)
class TPFollowerStats:
    worker_id: str  # "<routed worker id>/tp<rank>"
    rank: int
    world_size: int
    connected: bool  # joined its group
    applied: int  # calls handed to the apply thread so far (the highest number in order)
    free_blocks: int  # this rank's KV pool (the same state as rank 0's: SPMD)
    total_blocks: int
    error: str | None  # why the apply thread stopped, if it failed


class TPFollowerAPI(GroupMemberAPI):
    """What the control plane and rank 0 call on a follower rank (module docstring);
    ``join_group`` (GroupMemberAPI): the TP group as this rank."""

    @abc.abstractmethod
    def ping(self) -> str:
        """The follower's id once its shard is loaded; EngineStopped once it failed."""

    @abc.abstractmethod
    def stats(self) -> TPFollowerStats: ...

    @abc.abstractmethod
    def node_id(self) -> str: ...

    @abc.abstractmethod
    def submit(self, seq: int, call: WireCall) -> None:
        """Rank 0's call number ``seq`` (1, 2, ...); applied after every lower number.
        Raises TPFollowerFailed once an earlier call failed."""

    @abc.abstractmethod
    def check(self) -> str | None:
        """Why this rank failed, or None."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...


class TPFollowerWorker(TPFollowerAPI):
    def __init__(
        self,
        model: str,
        engine_options: dict[str, Any] | None,
        rank: int,
        world_size: int,
        worker_id: str,
        node_ip: str = "127.0.0.1",
        mode: str = "decode_only",
    ):
        """Rank ``rank`` (>= 1) of TP worker ``worker_id`` (rank 0's id): loads the shard, in
        rank 0's engine ``mode`` ("decode_only" for a decode/mixed worker, "prefill_only" for a
        prefill worker: every rank must schedule alike)."""
        if not 1 <= rank < world_size:
            raise ValueError(f"a follower is rank 1..{world_size - 1} of {world_size}, got {rank}")
        model = resolve_model_path(model)
        opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
        skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
        config = build_engine_config(model, **opts, mode=mode)
        self.worker_id = f"{worker_id}/tp{rank}"
        self.rank, self.world_size = rank, world_size
        self.comm = DeferredCommunicator(rank, world_size, _rank_device(config.device), name=f"tp/{worker_id}")
        self.engine = EngineCore(config, tensor_parallel=self.comm)
        self.tokenizer = load_tokenizer(model, skip_tokenizer_init)
        self._node_ip = node_ip
        self._lock = threading.Lock()
        self._next = 1  # the number of the next call to apply
        self._parked: dict[int, WireCall] = {}  # arrived ahead of a lower number
        self._applier = TPFollower(self.engine, self.worker_id)
        self._closed = False

    def ping(self) -> str:
        failure = self._applier.failure()
        if failure is not None and not self._closed:
            raise EngineStopped(failure)
        return self.worker_id

    def stats(self) -> TPFollowerStats:
        return TPFollowerStats(
            self.worker_id,
            self.rank,
            self.world_size,
            self.comm.connected,
            self._next - 1,
            self.engine.pool.num_free,
            self.engine.pool.num_blocks,
            self.check(),
        )

    def node_id(self) -> str:
        return "local"

    def node_ip(self) -> str:
        return self._node_ip

    def free_port(self) -> int:
        return free_port(self._node_ip)

    def join_group(self, spec: GroupSpec) -> None:
        join_deferred(self.comm, spec)

    def submit(self, seq: int, call: WireCall) -> None:
        with self._lock:
            if self._applier.error is not None:
                raise TPFollowerFailed(f"{self.worker_id}: {self.check()}")
            if seq < self._next or seq in self._parked:
                raise ValueError(f"{self.worker_id}: call {seq} arrived twice (next is {self._next})")
            self._parked[seq] = call
            while self._next in self._parked:  # hand over every call now in order
                self._applier.submit(from_wire(self._parked.pop(self._next), self.tokenizer))
                self._next += 1

    def check(self) -> str | None:
        e = self._applier.error
        return None if e is None else f"{type(e).__name__}: {e}"

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._applier.stop(timeout_s=5.0)
        except RuntimeError as e:  # blocked in a collective whose peers are gone: it fails on its own
            log.warning("%s", e)
            return  # the apply thread may still use the group: leave it to the process's end
        self.comm.close()


def _rank_device(device: str) -> torch.device:
    """The device a rank's collectives use: CPU for gloo, this process's current GPU for NCCL."""
    if device.startswith("cuda") and ":" not in device:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def build_leader(
    config: EngineConfig, followers: list[TPFollowerLink], worker_id: str
) -> tuple[TPLeaderEngine, DeferredCommunicator]:
    """Rank 0 of TP worker ``worker_id`` on its own process: its shard on a DeferredCommunicator
    (engine.runtime.groups.join_deferred connects it at the worker's ``join_group``), wrapped
    in a TPLeaderEngine that replays its calls on ``followers`` (ranks 1..N-1)."""
    comm = DeferredCommunicator(0, len(followers) + 1, _rank_device(config.device), name=f"tp/{worker_id}")
    return TPLeaderEngine(EngineCore(config, progress=True, tensor_parallel=comm), followers), comm


# ---------------------------------------------------------------- rank 0's side
class FollowerChannel(Protocol):
    """How rank 0 reaches one follower process (``FutureFollowerChannel`` over Ray actor
    calls, see decode_worker/actor.py and prefill_worker/actor.py, or a test's stand-in). ``send`` returns at once; ``failures`` reports sends that failed (the
    follower raised or is gone) without blocking; ``ask`` calls the follower's ``check``,
    waiting at most ``timeout_s`` (raises if it cannot answer)."""

    def send(self, seq: int, call: WireCall) -> None: ...

    def failures(self) -> list[str]: ...

    def ask(self, timeout_s: float) -> str | None: ...


# RPC errors that mean the follower's process is gone (Ray's, matched by class name so that
# this module needs no RPC library): reported as "actor gone: <class>"
_GONE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError"})


def describe_remote_error(e: BaseException) -> str:
    """One line for an RPC error: "actor gone: ..." for a dead process, else the remote
    exception's own class and last message line (``e.cause``, where the RPC wraps it)."""
    if any(c.__name__ in _GONE for c in type(e).__mro__):
        return f"actor gone: {type(e).__name__}"
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1].strip() if lines else ''}"[:500]


class FutureFollowerChannel:
    """A FollowerChannel over an RPC whose calls return futures: ``submit(seq, call)`` sends
    the follower its call (e.g. ``lambda s, c: actor.submit.remote(s, c).future()`` on Ray),
    ``check()`` asks it why it failed. Keeps the futures of the submissions not yet known to
    have succeeded; ``failures`` collects the finished ones without blocking."""

    def __init__(
        self,
        submit: Callable[[int, WireCall], Future[None]],
        check: Callable[[], Future[str | None]],
    ):
        self._submit, self._check = submit, check
        self._pending: list[Future[None]] = []  # oldest first

    def send(self, seq: int, call: WireCall) -> None:
        self._pending.append(self._submit(seq, call))

    def failures(self) -> list[str]:
        done = [f for f in self._pending if f.done()]
        if not done:
            return []
        self._pending = [f for f in self._pending if not f.done()]
        return [describe_remote_error(e) for e in (f.exception() for f in done) if e is not None]

    def ask(self, timeout_s: float) -> str | None:
        try:
            return self._check().result(timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - reported to the caller as the follower's failure
            raise RuntimeError(describe_remote_error(e)) from None


class RemoteFollower:
    """A TPFollowerLink over a FollowerChannel: numbers the calls (from 1), sends them in the
    wire form, remembers the first failure."""

    def __init__(self, name: str, channel: FollowerChannel):
        self.name = name
        self.channel = channel
        self._seq = 0
        self._failure: str | None = None
        # rank 0's loop thread and its KV receiver's transport thread (WriteKV) both submit:
        # a number and its send go together, so numbers leave in the order they were taken
        self._submit_lock = threading.Lock()

    def submit(self, call: EngineCall) -> None:
        wire = to_wire(call)
        with self._submit_lock:
            self._seq += 1
            self.channel.send(self._seq, wire)

    def failure(self, wait_s: float = 0.0) -> str | None:
        if self._failure is None:
            failed = self.channel.failures()
            if failed:
                self._failure = f"{self.name}: {failed[0]}"
        if self._failure is None and wait_s > 0:
            try:
                answer = self.channel.ask(wait_s)
            except Exception as e:  # noqa: BLE001 - any way it cannot answer means it is gone or hung
                answer = f"did not answer: {type(e).__name__}: {e}"
            if answer is not None:
                self._failure = f"{self.name}: {answer}"
        return self._failure
