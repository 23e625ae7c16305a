"""cluster/control/groups.py between real Ray actors on a local Ray instance: two actors form a
gloo group through form_group and run collectives over TorchDistCommunicator; a killed rank fails
its peer's collective within seconds; a rank that never joins is named, and its peer fails its
join within the timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import ray
import torch

from cluster.control.groups import GroupFormationError, form_group
from engine.parallel import TorchDistCommunicator
from engine.runtime.groups import GroupSpec, free_port, join_group

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0, max_concurrency=4)
class GroupActor:
    """A worker stand-in: joins groups in its own process and runs collectives on request."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.comm: TorchDistCommunicator | None = None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port(self.node_ip())

    def join_group(self, spec: GroupSpec) -> None:
        self.comm = TorchDistCommunicator(join_group(spec), timeout_s=spec.timeout_s, name=spec.name)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        assert self.comm is not None
        return self.comm.all_reduce(x)

    def all_to_all(self, x: torch.Tensor, send_splits: list[int]) -> torch.Tensor:
        assert self.comm is not None
        return self.comm.all_to_all(x, send_splits)


class ActorMember:
    """GroupMember over a GroupActor handle (what the worker handles will implement)."""

    def __init__(self, worker_id: str, actor: Any):
        self.worker_id = worker_id
        self.actor = actor

    async def node_ip(self) -> str:
        return await self.actor.node_ip.remote()

    async def free_port(self) -> int:
        return await self.actor.free_port.remote()

    async def join_group(self, spec: GroupSpec) -> None:
        await self.actor.join_group.remote(spec)


class NeverJoins(ActorMember):
    async def join_group(self, spec: GroupSpec) -> None:
        await asyncio.Event().wait()


def _actors(n: int) -> list[Any]:
    actors = [GroupActor.remote() for _ in range(n)]
    ray.get([a.node_ip.remote() for a in actors])  # started
    return actors


@pytest.fixture(scope="module")
def pair(ray_local):
    """Two live actors; each test forms its own group on them (groups are independent)."""
    actors = _actors(2)
    yield actors
    for a in actors:
        ray.kill(a)


def test_two_actors_form_a_gloo_group_and_run_collectives(pair) -> None:
    actors = pair
    members = [ActorMember(f"w{r}", a) for r, a in enumerate(actors)]
    specs = asyncio.run(form_group("test/collectives", members, backend="gloo", timeout_s=10.0))
    assert [(s.rank, s.world_size) for s in specs] == [(0, 2), (1, 2)]

    sums = ray.get([a.all_reduce.remote(torch.tensor([r + 1.0, 10.0])) for r, a in enumerate(actors)])
    assert [s.tolist() for s in sums] == [[3.0, 20.0], [3.0, 20.0]]

    # variable token counts per peer, as EP dispatch sends: w0 keeps 1 row, sends 2; w1 sends 3, keeps 0
    sends = [[1, 2], [3, 0]]
    rows = [torch.full((sum(s), 2), float(r)) for r, s in enumerate(sends)]
    got = ray.get([a.all_to_all.remote(rows[r], sends[r]) for r, a in enumerate(actors)])
    assert got[0][:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert got[1][:, 0].tolist() == [0.0, 0.0]


def test_a_killed_rank_fails_its_peer_within_seconds(ray_local) -> None:
    actors = _actors(2)
    members = [ActorMember(f"w{r}", a) for r, a in enumerate(actors)]
    asyncio.run(form_group("test/killed", members, backend="gloo", timeout_s=3.0))
    ray.kill(actors[1], no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="CommunicationError: all_reduce failed on 'test/killed'"):
        ray.get(actors[0].all_reduce.remote(torch.ones(4)), timeout=60)
    assert time.monotonic() - t0 < 8.0  # the 3 s timeout at most, not gloo's 30 minutes
    ray.kill(actors[0])


def test_a_rank_that_never_joins_is_named_and_its_peer_fails_within_the_timeout(pair) -> None:
    actors = pair
    members = [ActorMember("w0", actors[0]), NeverJoins("w1", actors[1])]
    t0 = time.monotonic()
    with pytest.raises(GroupFormationError) as err:
        asyncio.run(form_group("test/lonely", members, backend="gloo", timeout_s=2.0, grace_s=1.0))
    assert time.monotonic() - t0 < 8.0
    first, second = err.value.failures
    assert (first.worker_id, first.answered) == ("w1", False)
    assert second.worker_id == "w0" and "could not join" in second.cause, second
