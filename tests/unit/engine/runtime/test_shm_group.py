"""engine/runtime/shm_group.py: what the shm backend adds to the Communicator contract (which
tests/unit/engine/test_parallel.py checks for gloo and shm alike): three ranks reducing to the
same bits, messages larger than the ring, no /dev/shm file left behind, one node only, and a
peer process that dies failing the survivors at once, not after the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed import PrefixStore, TCPStore

from engine.parallel import CommunicationError
from engine.runtime import shm_group
from engine.runtime.groups import GroupJoinError, GroupSpec, free_port, join_communicator, join_group
from engine.runtime.shm_group import ShmCommunicator, join_shm
from tests.unit.engine.gloo_ranks import HOST, run_ranks, shm_comms

REPO = Path(__file__).resolve().parents[4]


def _leftover_rings() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("splitserve-")}


def _join_small_rings(world_size: int, ring_bytes: int) -> list[ShmCommunicator]:
    port = free_port(HOST)

    def join(r: int) -> ShmCommunicator:
        store = TCPStore(HOST, port, is_master=r == 0, wait_for_workers=False)
        return join_shm("small", r, world_size, PrefixStore("t", store), 10.0, ring_bytes=ring_bytes)

    return run_ranks(join, world_size)


def test_three_ranks_reduce_in_rank_order_to_the_same_bits() -> None:
    comms = shm_comms(3)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g) * 10 ** (r * 3) for r in range(3)]  # float32: order matters

    def ops(r: int) -> dict[str, torch.Tensor]:
        c = comms[r]
        send = [[2, 0, 1], [0, 0, 3], [1, 1, 0]][r]
        rows = torch.full((sum(send), 2), float(r))
        return {
            "all_reduce": c.all_reduce(xs[r].clone()),
            "reduce_scatter": c.reduce_scatter(xs[r].clone()),
            "all_gather": c.all_gather(xs[r][:1].clone()),
            "all_to_all": c.all_to_all(rows, send),
        }

    out = run_ranks(ops, 3)
    want = (xs[0] + xs[1]) + xs[2]
    for r in range(3):
        assert torch.equal(out[r]["all_reduce"], want)
        assert torch.equal(out[r]["reduce_scatter"], want[2 * r : 2 * r + 2])
        assert torch.equal(out[r]["all_gather"], torch.cat([x[:1] for x in xs]))
    # rank 2 receives rank 0's third part (1 row), rank 1's third part (3 rows), none of its own
    assert out[2]["all_to_all"][:, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert out[0]["all_to_all"][:, 0].tolist() == [0.0, 0.0, 2.0]


def test_messages_larger_than_the_ring_go_in_chunks_both_ways_at_once() -> None:
    ring = 64 << 10  # 64 KiB ring, 16 KiB chunks; each rank sends 1 MiB to the other at once
    comms = _join_small_rings(2, ring)
    assert comms[0].chunk_bytes == 16 << 10
    xs = [torch.randn(256 << 10, generator=torch.Generator().manual_seed(r)) for r in range(2)]  # 1 MiB each
    before = [c.bytes_sent for c in comms]

    def ops(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = comms[r]
        halves = [xs[r].numel() // 2] * 2
        swapped = c.all_to_all(xs[r], halves, halves)
        c.send(xs[r][:1000], 1 - r, tag=9)  # tagged p2p beside the collectives
        got = c.recv(torch.empty(1000), 1 - r, tag=9)
        return swapped, got

    out = run_ranks(ops)
    half = xs[0].numel() // 2
    assert torch.equal(out[0][0], torch.cat([xs[0][:half], xs[1][:half]]))
    assert torch.equal(out[1][0], torch.cat([xs[0][half:], xs[1][half:]]))
    assert torch.equal(out[0][1], xs[1][:1000]) and torch.equal(out[1][1], xs[0][:1000])
    # the bytes that crossed: half of each tensor plus the tagged 1000 floats, each way
    assert [c.bytes_sent - b for c, b in zip(comms, before, strict=True)] == [half * 4 + 4000] * 2


def test_join_creates_no_file_in_dev_shm_and_refuses_ranks_on_other_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _leftover_rings()
    shm_comms(2)
    assert _leftover_rings() == before
    # each rank thread believes it is on its own node
    monkeypatch.setattr(shm_group, "node_identity", lambda: threading.current_thread().name)
    with pytest.raises(GroupJoinError, match="needs every rank on one node"):
        shm_comms(2)
    assert _leftover_rings() == before


def test_shm_is_no_torch_distributed_group() -> None:
    spec = GroupSpec("x", 0, 1, HOST, free_port(HOST), "shm", 1.0)
    with pytest.raises(GroupJoinError, match="use join_communicator"):
        join_group(spec)


def test_a_closed_peer_fails_the_waiting_rank_at_once_and_breaks_the_group() -> None:
    comms = shm_comms(2, timeout_s=30.0)
    t0 = time.monotonic()
    comms[1].close()
    with pytest.raises(CommunicationError, match="channel to rank 1 ended"):
        comms[0].recv(torch.empty(4), 1, tag=0)
    assert time.monotonic() - t0 < 5.0  # not the 30 s timeout
    with pytest.raises(CommunicationError, match="group is broken"):
        comms[0].all_reduce(torch.ones(2))


def test_a_peer_process_that_dies_fails_the_survivor_within_seconds(tmp_path: Path) -> None:
    port = free_port(HOST)
    child = textwrap.dedent(
        f"""
        import os, torch
        from engine.runtime.groups import GroupSpec, join_communicator
        comm = join_communicator(GroupSpec("die", 1, 2, {HOST!r}, {port}, "shm", 30.0))
        comm.send(torch.arange(3.0), 0, tag=1)
        os._exit(3)  # dies without closing anything: the kernel closes its sockets
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        comm = join_communicator(GroupSpec("die", 0, 2, HOST, port, "shm", 30.0))
        assert comm.recv(torch.empty(3), 1, tag=1).tolist() == [0.0, 1.0, 2.0]
        t0 = time.monotonic()
        with pytest.raises(CommunicationError, match="channel to rank 1 ended"):
            comm.all_reduce(torch.ones(2))
        assert time.monotonic() - t0 < 10.0  # the 30 s group timeout never comes into it
    finally:
        assert proc.wait(60) == 3
