"""cluster/control/groups.py: form_group over in-process members whose ranks join real gloo
groups on threads (loopback), and the failures it must name."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cluster.control.groups import GroupFormationError, GroupMember, form_group
from engine.parallel import ProcessGroup, TorchDistCommunicator
from engine.runtime.groups import GroupSpec, free_port, join_group

HOST = "127.0.0.1"


class ThreadMember:
    """A GroupMember that joins on a thread of this process (a worker process stand-in)."""

    def __init__(self, worker_id: str, ip: str = HOST):
        self.worker_id = worker_id
        self.ip = ip
        self.ports_given = 0
        self.spec: GroupSpec | None = None
        self.group: ProcessGroup | None = None

    async def node_ip(self) -> str:
        return self.ip

    async def free_port(self) -> int:
        self.ports_given += 1
        return free_port(self.ip)

    async def join_group(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.group = await asyncio.to_thread(join_group, spec)


class HungMember(ThreadMember):
    async def join_group(self, spec: GroupSpec) -> None:
        self.spec = spec
        await asyncio.Event().wait()  # never answers


class FailingMember(ThreadMember):
    async def join_group(self, spec: GroupSpec) -> None:
        raise RuntimeError("actor died\nline two: the cause")


class NoAddressMember(ThreadMember):
    async def node_ip(self) -> str:
        raise ConnectionError("node unreachable")


def _form(members: list[GroupMember], timeout_s: float = 5.0, grace_s: float = 0.5) -> list[GroupSpec]:
    return asyncio.run(form_group("tp/decode-0", members, backend="gloo", timeout_s=timeout_s, grace_s=grace_s))


def test_members_form_one_group_with_rank_0_hosting_the_rendezvous() -> None:
    members = [ThreadMember("decode-0"), ThreadMember("decode-1"), ThreadMember("decode-2")]
    specs = _form(members)
    assert [s.rank for s in specs] == [0, 1, 2]
    assert {(s.name, s.world_size, s.host, s.port, s.backend, s.timeout_s) for s in specs} == {
        ("tp/decode-0", 3, HOST, specs[0].port, "gloo", 5.0)
    }
    assert [m.spec for m in members] == specs
    assert [s.local_host for s in specs] == [HOST] * 3
    assert [m.ports_given for m in members] == [1, 0, 0]  # only rank 0's node picks the port

    comms = [TorchDistCommunicator(m.group, timeout_s=5.0) for m in members]

    async def all_reduce_everywhere() -> list[float]:
        outs = await asyncio.gather(*(asyncio.to_thread(c.all_reduce, torch.tensor([float(c.rank)])) for c in comms))
        return [o.item() for o in outs]

    assert asyncio.run(all_reduce_everywhere()) == [3.0, 3.0, 3.0]


def test_a_member_that_never_answers_is_named_first_and_the_others_fail_within_the_timeout() -> None:
    ok, hung = ThreadMember("decode-0"), HungMember("decode-1")
    t0 = time.monotonic()
    with pytest.raises(GroupFormationError) as err:
        _form([ok, hung], timeout_s=1.0, grace_s=0.5)
    assert time.monotonic() - t0 < 5.0
    first, second = err.value.failures
    assert (first.worker_id, first.rank, first.step, first.answered) == ("decode-1", 1, "join_group", False)
    assert first.cause == "no answer within 1.5 s"
    assert (second.worker_id, second.answered) == ("decode-0", True)
    assert "GroupJoinError" in second.cause and "could not join" in second.cause
    assert err.value.failed_members == ("decode-1", "decode-0")
    assert str(err.value).startswith("group 'tp/decode-0' did not form: decode-1 (rank 1) join_group: no answer")


def test_a_member_whose_join_fails_is_named_before_the_ranks_it_left_waiting() -> None:
    with pytest.raises(GroupFormationError) as err:
        _form([ThreadMember("decode-0"), FailingMember("decode-1")], timeout_s=1.0)
    first, second = err.value.failures
    assert (first.worker_id, first.cause) == ("decode-1", "RuntimeError: line two: the cause")
    assert second.worker_id == "decode-0" and "GroupJoinError" in second.cause


def test_a_member_without_an_address_fails_before_anyone_joins() -> None:
    members = [ThreadMember("decode-0"), NoAddressMember("decode-1")]
    with pytest.raises(GroupFormationError, match=r"decode-1 \(rank 1\) node_ip: ConnectionError: node unreachable"):
        _form(members)
    assert [m.spec for m in members] == [None, None]


@pytest.mark.parametrize(
    ("members", "kwargs", "message"),
    [
        ([], {}, "no members"),
        ([ThreadMember("a"), ThreadMember("a")], {}, "duplicate members"),
        ([ThreadMember("a")], {"timeout_s": -1.0}, "timeout_s must be a positive number"),
        ([ThreadMember("a")], {"grace_s": -1.0}, "grace_s must be >= 0"),
        ([ThreadMember("a")], {"backend": "mpi"}, "backend must be one of"),
    ],
)
def test_bad_arguments_are_refused_before_any_join(members: list[ThreadMember], kwargs: dict, message: str) -> None:
    args = {"backend": "gloo", "timeout_s": 5.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        asyncio.run(form_group("g", members, **args))
    assert all(m.spec is None and m.ports_given == 0 for m in members)
