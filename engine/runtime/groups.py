"""Joining torch.distributed process groups from a worker process.

This is the ONE file in ``engine`` that creates process groups (tests/test_architecture.py
exempts exactly it): the worker runtime joins the groups its worker needs (TP ranks, an EP
group, model <-> attention workers, KV transfer pairs) and hands them, wrapped in an
``engine.parallel.TorchDistCommunicator``, to the engine core by injection
(``join_communicator`` does both; for the "shm" backend, ranks of one node over shared memory,
it returns an engine/runtime/shm_group.ShmCommunicator instead). The engine core,
models, attention and scheduler never create groups.

No global default group: ``torch.distributed.init_process_group`` is never called. Each group
is a backend object (``ProcessGroupGloo`` / ``ProcessGroupNCCL``) built straight on a
``PrefixStore`` of a ``TCPStore``, so one process can be in any number of independent groups.
The torch.distributed module-level functions (``dist.all_reduce(..., group=)``) do not accept
such groups; use ``TorchDistCommunicator``, which calls the group's own methods.

Lifecycle of one group, every rank running ``join_group(spec)`` at the same time::

    rank 0: host the TCPStore at spec.host:spec.port   ranks > 0: connect to it as clients
    all:    build the backend on PrefixStore("groups/<name>")  (gloo: full-mesh connect)
    all:    one all-reduce of 1s, checked == world_size            -> the group is returned

Every step carries ``spec.timeout_s``: a rank that never joins fails the others within it, and
so does a collective whose peer died or hangs (gloo's own default would be 30 minutes).
A timed-out or failed op leaves a gloo group unusable (gloo closes the pair): the worker is
failed and the group formed again, never reused.

The store lives as long as the group (the backend holds a reference to it). On rank 0 it is
the store's server, so rank 0's process must outlive the others' use of the store (NCCL
creates its communicators lazily through it).
"""

from __future__ import annotations

import datetime
import math
import socket
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore

from engine.parallel import Communicator, DeferredCommunicator, ProcessGroup, TorchDistCommunicator
from engine.runtime.shm_group import join_shm

# "shm": the ranks of one node over shared memory (engine/runtime/shm_group.py): not a
# torch.distributed group, so only ``join_communicator`` joins it.
GroupBackend = Literal["gloo", "nccl", "shm"]
BACKENDS: tuple[GroupBackend, ...] = ("gloo", "nccl", "shm")


class GroupJoinError(RuntimeError):
    """This rank could not join its group (a peer never came, the store was unreachable, the
    backend is unavailable here, or the ranks disagree on the group's size)."""


@dataclass(frozen=True)
class GroupSpec:
    """What one rank needs to join one group. The driver builds one per rank
    (cluster/control/groups.py); every field but ``rank`` and ``local_host`` is equal across
    the ranks of a group."""

    name: str  # unique among the groups live at the same rendezvous; namespaces the store keys
    rank: int  # this process's rank, 0 <= rank < world_size
    world_size: int
    host: str  # rendezvous: address of the TCPStore (rank 0's node unless a caller passes a store)
    port: int  # rendezvous TCP port on host (picked free on that node: free_port())
    backend: GroupBackend  # "gloo" (CPU tensors), "nccl" (CUDA tensors) or "shm" (CPU, one node)
    timeout_s: float  # rendezvous, join and every op of the group; a dead peer fails within it
    # the address this rank's gloo transport binds to (its node's IP); None = torch's default
    # (GLOO_SOCKET_IFNAME, else the hostname's address, which is 127.0.1.1 on some distros)
    local_host: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("GroupSpec.name must be non-empty")
        if self.world_size < 1:
            raise ValueError(f"GroupSpec.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"GroupSpec.rank must be in [0, {self.world_size}), got {self.rank}")
        if not self.host:
            raise ValueError("GroupSpec.host must be non-empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"GroupSpec.port must be in 1..65535, got {self.port}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GroupSpec.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"GroupSpec.timeout_s must be a positive number of seconds, got {self.timeout_s}")

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def describe(self) -> str:
        return f"group {self.name!r} rank {self.rank}/{self.world_size} ({self.backend}, {self.host}:{self.port})"


def free_port(host: str = "") -> int:
    """A TCP port free on this node right now, for a store that ``host`` will serve.

    Another process may take it before the store binds it; the join then fails loudly
    ("address already in use") and the driver forms the group again."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def join_communicator(spec: GroupSpec) -> Communicator:
    """Join ``spec``'s group (every rank at once) and return this rank's Communicator: a
    TorchDistCommunicator for gloo/NCCL, an ShmCommunicator for "shm" (one node; rendezvous
    over the same TCPStore). Ops are bounded by spec.timeout_s. Raises GroupJoinError."""
    if spec.backend != "shm":
        return TorchDistCommunicator(join_group(spec), timeout_s=spec.timeout_s, name=spec.name)
    try:
        store = TCPStore(spec.host, spec.port, is_master=spec.rank == 0, timeout=spec.timeout, wait_for_workers=False)
        return join_shm(
            spec.name, spec.rank, spec.world_size, PrefixStore(f"groups/{spec.name}", store), spec.timeout_s
        )
    except Exception as e:  # noqa: BLE001 - store, node and mapping errors all mean "could not join"
        raise GroupJoinError(f"{spec.describe()} could not join: {type(e).__name__}: {e}") from e


def join_group(spec: GroupSpec, store: Store | None = None) -> ProcessGroup:
    """Join the group ``spec`` describes; returns once every rank joined (blocks until then).

    ``store``: an open client of the store at spec.host:spec.port, for callers that already
    rendezvoused over it (kv_transfer's pairs, whose receiver hosts it); ``None`` opens one,
    rank 0 hosting it. Raises GroupJoinError naming the group and rank, within spec.timeout_s.
    A torch.distributed group only: "shm" groups are joined by ``join_communicator``.
    """
    if spec.backend == "shm":
        raise GroupJoinError(f"{spec.describe()}: an shm group is no torch.distributed group; use join_communicator")
    try:
        if store is None:
            store = TCPStore(
                spec.host, spec.port, is_master=spec.rank == 0, timeout=spec.timeout, wait_for_workers=False
            )
        group = _build_backend(PrefixStore(f"groups/{spec.name}", store), spec)
        _check_membership(group, spec)
    except GroupJoinError:
        raise
    except Exception as e:  # noqa: BLE001 - store, connect and backend errors all mean "could not join"
        raise GroupJoinError(f"{spec.describe()} could not join: {type(e).__name__}: {e}") from e
    return group


def join_deferred(comm: DeferredCommunicator, spec: GroupSpec) -> None:
    """Join ``spec``'s group as ``comm``'s rank and connect ``comm`` to it (a rank built before
    its group: engine/parallel.DeferredCommunicator). ValueError if ``spec`` names another rank
    or group size than ``comm`` was built for; GroupJoinError as ``join_group``."""
    if (spec.rank, spec.world_size) != (comm.rank, comm.world_size):
        raise ValueError(
            f"{comm.name!r}: this rank was built as rank {comm.rank} of {comm.world_size}, asked to join "
            f"as rank {spec.rank} of {spec.world_size}"
        )
    comm.connect(join_communicator(spec))


def _build_backend(store: Store, spec: GroupSpec) -> ProcessGroup:
    if spec.backend == "gloo":
        opts = ProcessGroupGloo._Options()
        opts._timeout = spec.timeout
        opts._devices = [
            ProcessGroupGloo.create_device(hostname=spec.local_host)
            if spec.local_host
            else ProcessGroupGloo.create_default_device()
        ]
        return ProcessGroupGloo(store, spec.rank, spec.world_size, opts)
    if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        raise GroupJoinError(f"{spec.describe()}: backend 'nccl' needs CUDA and a torch build with NCCL")
    from torch.distributed import ProcessGroupNCCL  # CUDA builds only

    opts = ProcessGroupNCCL.Options()
    opts._timeout = spec.timeout  # the NCCL watchdog fails ops (and the process) past it
    return ProcessGroupNCCL(store, spec.rank, spec.world_size, opts)


def _check_membership(group: ProcessGroup, spec: GroupSpec) -> None:
    """One all-reduce of ones: proves every rank is connected (NCCL connects lazily, here) and
    that they agree on world_size (a disagreement hangs, so it surfaces as the timeout)."""
    device = torch.device("cuda", torch.cuda.current_device()) if spec.backend == "nccl" else torch.device("cpu")
    ones = torch.ones(1, dtype=torch.int64, device=device)
    opts = torch.distributed.AllreduceOptions()
    opts.timeout = spec.timeout
    group.allreduce([ones], opts).wait(spec.timeout)
    if int(ones.item()) != spec.world_size:
        raise GroupJoinError(f"{spec.describe()}: {int(ones.item())} ranks joined, expected {spec.world_size}")
