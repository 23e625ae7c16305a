"""Test helper: the ranks of a gloo (or shm) group as threads of this process, over loopback.

Gloo runs its ops on its own threads and releases the GIL while waiting, so threads are
real, independent ranks (and far cheaper to start than processes).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from engine.parallel import Communicator, ProcessGroup, TorchDistCommunicator
from engine.runtime.groups import GroupSpec, free_port, join_communicator, join_group

T = TypeVar("T")
HOST = "127.0.0.1"


def run_ranks(fn: Callable[[int], T], world_size: int = 2, timeout_s: float = 30.0) -> list[T]:
    """fn(rank) on world_size threads at once -> results by rank; re-raises rank order's first error."""
    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(fn, rank) for rank in range(world_size)]
        return [f.result(timeout=timeout_s) for f in futures]


def spec(rank: int, world_size: int, port: int, name: str = "test", timeout_s: float = 5.0) -> GroupSpec:
    return GroupSpec(name, rank, world_size, HOST, port, "gloo", timeout_s, local_host=HOST)


def gloo_groups(world_size: int = 2, name: str = "test", timeout_s: float = 5.0) -> list[ProcessGroup]:
    """Joins one fresh gloo group of world_size ranks (by rank)."""
    port = free_port(HOST)
    return run_ranks(lambda r: join_group(spec(r, world_size, port, name, timeout_s)), world_size)


def gloo_comms(world_size: int = 2, timeout_s: float = 5.0) -> list[TorchDistCommunicator]:
    return [
        TorchDistCommunicator(g, timeout_s=timeout_s, name="test") for g in gloo_groups(world_size, "test", timeout_s)
    ]


def shm_comms(world_size: int = 2, timeout_s: float = 5.0, name: str = "test") -> list[Communicator]:
    """One fresh "shm" group (engine/runtime/shm_group.py) of world_size ranks, by rank."""
    port = free_port(HOST)
    specs = [GroupSpec(name, r, world_size, HOST, port, "shm", timeout_s) for r in range(world_size)]
    return run_ranks(lambda r: join_communicator(specs[r]), world_size)


def comms_of(backend: str, world_size: int = 2, timeout_s: float = 5.0) -> list[Communicator]:
    """A fresh group of ``backend`` ("gloo" or "shm"): the same Communicator contract."""
    if backend == "gloo":
        return list(gloo_comms(world_size, timeout_s))
    return shm_comms(world_size, timeout_s)
