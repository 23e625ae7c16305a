"""engine/runtime/groups.py: GroupSpec validation and join_group over loopback TCP, the ranks as
threads (gloo), plus NCCL checks that run only where CUDA is."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed import TCPStore

from engine.parallel import TorchDistCommunicator
from engine.runtime.groups import GroupJoinError, GroupSpec, free_port, join_group
from tests.prereq import require_hardware
from tests.unit.engine.gloo_ranks import HOST, run_ranks, spec

VALID = GroupSpec("tp", 1, 2, HOST, 1234, "gloo", 5.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "name must be non-empty"),
        ({"world_size": 0}, "world_size must be >= 1"),
        ({"rank": 2}, r"rank must be in \[0, 2\)"),
        ({"rank": -1}, r"rank must be in \[0, 2\)"),
        ({"host": ""}, "host must be non-empty"),
        ({"port": 0}, "port must be in 1..65535"),
        ({"backend": "mpi"}, "backend must be one of"),
        ({"timeout_s": 0.0}, "timeout_s must be a positive number"),
        ({"timeout_s": float("inf")}, "timeout_s must be a positive number"),
    ],
)
def test_group_spec_refuses_bad_fields(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(VALID, **change)


def test_free_port_can_be_bound() -> None:
    port = free_port(HOST)
    with socket.socket() as s:
        s.bind((HOST, port))  # raises if the port were taken


def test_ranks_join_a_group_without_a_default_group() -> None:
    port = free_port(HOST)

    def rank_fn(r: int) -> torch.Tensor:
        group = join_group(spec(r, 3, port))
        assert (group.rank(), group.size()) == (r, 3)
        return TorchDistCommunicator(group, timeout_s=5.0).all_reduce(torch.tensor([float(r)]))

    assert [t.item() for t in run_ranks(rank_fn, world_size=3)] == [3.0, 3.0, 3.0]
    assert not dist.is_initialized(), "join_group must not create torch.distributed's default group"


def test_one_process_holds_independent_groups() -> None:
    """Two groups per rank at once (as a TP rank that is also in an EP group would be): ops on one
    do not pair with the other's, even interleaved and in opposite orders."""
    port_a, port_b = free_port(HOST), free_port(HOST)

    def rank_fn(r: int) -> tuple[float, float]:
        a = TorchDistCommunicator(join_group(spec(r, 2, port_a, name="a")), timeout_s=5.0)
        b = TorchDistCommunicator(join_group(spec(r, 2, port_b, name="b")), timeout_s=5.0)
        first, second = (a, b) if r == 0 else (b, a)  # opposite issue order on the two ranks
        p1 = first.all_reduce_async(torch.tensor([1.0 if first is a else 10.0]))
        p2 = second.all_reduce_async(torch.tensor([1.0 if second is a else 10.0]))
        results = {first: p1.wait().item(), second: p2.wait().item()}
        return results[a], results[b]

    assert run_ranks(rank_fn) == [(2.0, 20.0), (2.0, 20.0)]


def test_groups_share_a_store_a_caller_already_opened() -> None:
    """kv_transfer's pairs: the receiver (rank 1) hosts the store; several groups live on it."""
    port = free_port(HOST)
    master = TCPStore(HOST, port, is_master=True, wait_for_workers=False)

    def rank_fn(r: int) -> list[float]:
        client = TCPStore(HOST, port, is_master=False)
        out = []
        for name in ("kv/0/ctl", "kv/1/ctl"):
            group = join_group(spec(r, 2, port, name=name), store=client)
            out.append(TorchDistCommunicator(group, timeout_s=5.0).all_reduce(torch.tensor([r + 1.0])).item())
        return out

    assert run_ranks(rank_fn) == [[3.0, 3.0], [3.0, 3.0]]
    del master


def test_a_rank_that_never_joins_fails_the_others_within_the_timeout() -> None:
    port = free_port(HOST)
    t0 = time.monotonic()
    with pytest.raises(GroupJoinError, match=r"group 'lonely' rank 0/2 \(gloo, 127.0.0.1:\d+\) could not join"):
        join_group(spec(0, 2, port, name="lonely", timeout_s=1.0))
    assert time.monotonic() - t0 < 5.0


def test_ranks_that_disagree_on_the_world_size_fail_to_join() -> None:
    port = free_port(HOST)

    def rank_fn(r: int) -> str:
        try:
            join_group(spec(r, 3 if r == 0 else 2, port, name="mismatch", timeout_s=1.0))
        except GroupJoinError as e:
            return str(e)
        return "joined"

    results = run_ranks(rank_fn)
    assert results[0].startswith("group 'mismatch' rank 0/3"), results
    assert results[1].startswith("group 'mismatch' rank 1/2"), results
    assert all("could not join" in r for r in results), results


def test_nccl_without_cuda_is_a_clear_join_error() -> None:
    require_hardware(not torch.cuda.is_available(), "CUDA is available here: the NCCL path is covered by the gpu tests")
    with pytest.raises(GroupJoinError, match="backend 'nccl' needs CUDA"):
        join_group(dataclasses.replace(spec(0, 1, free_port(HOST)), backend="nccl"))


@pytest.mark.gpu
def test_nccl_group_of_one_runs_every_collective_on_the_gpu() -> None:
    group = join_group(dataclasses.replace(spec(0, 1, free_port(HOST)), backend="nccl"))
    comm = TorchDistCommunicator(group, timeout_s=10.0)
    assert comm.device.type == "cuda"
    x = torch.arange(6.0, device="cuda").reshape(3, 2)
    assert torch.equal(comm.all_reduce(x.clone()), x)
    assert torch.equal(comm.all_gather(x.clone()), x)
    assert torch.equal(comm.reduce_scatter(x.clone()), x)
    assert torch.equal(comm.all_to_all(x.clone(), [3]), x)


@pytest.mark.gpu
def test_nccl_group_of_two_gpus() -> None:
    require_hardware(torch.cuda.device_count() >= 2, "needs two CUDA devices")
    port = free_port(HOST)

    def rank_fn(r: int) -> list[torch.Tensor]:
        torch.cuda.set_device(r)
        comm = TorchDistCommunicator(join_group(dataclasses.replace(spec(r, 2, port), backend="nccl")), timeout_s=10.0)
        x = torch.full((4, 2), float(r + 1), device="cuda")
        send = [[1, 3], [2, 2]][r]
        out = [comm.all_reduce(x.clone()), comm.reduce_scatter(x.clone()), comm.all_to_all(x.clone(), send)]
        if r == 0:
            comm.send(torch.ones(3, device="cuda"), 1)
        else:
            out.append(comm.recv(torch.zeros(3, device="cuda"), 0))
        torch.cuda.synchronize()
        return [t.cpu() for t in out]

    out = run_ranks(rank_fn)
    for r in (0, 1):
        assert torch.equal(out[r][0], torch.full((4, 2), 3.0))
        assert torch.equal(out[r][1], torch.full((2, 2), 3.0))
    assert torch.equal(out[0][2][:, 0], torch.tensor([1.0, 2, 2]))  # 1 row from itself, 2 from rank 1
    assert torch.equal(out[1][2][:, 0], torch.tensor([1.0, 1, 1, 2, 2]))
    assert torch.equal(out[1][3], torch.ones(3))
