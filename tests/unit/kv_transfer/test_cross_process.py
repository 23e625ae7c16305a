"""Sender in a separate process (``python -m tests.unit.kv_transfer.kvt_helpers``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kv_cache.paged_cache import PagedKVCache
from kv_transfer import TransferStatus, make_receiver
from tests.unit.kv_transfer.kvt_helpers import (
    CUT_RID,
    LAYOUT,
    NUM_BLOCKS,
    SCENARIO,
    assign_blocks,
    pages_for,
    wait_terminal,
    wait_until,
)

S = TransferStatus
REPO = Path(__file__).resolve().parents[3]
TIMEOUT_S = 60  # a hang fails the test instead of blocking the suite


@pytest.mark.parametrize(
    "kind, ending",
    [
        ("shm", "die"),
        ("torch", "die"),
        pytest.param("shm", "exit", marks=pytest.mark.slow),
        pytest.param("torch", "exit", marks=pytest.mark.slow),
        pytest.param("grpc", "die", marks=pytest.mark.slow),
    ],
)
def test_sender_in_another_process(kind, ending):
    cache = PagedKVCache(LAYOUT, NUM_BLOCKS)
    rx = make_receiver(kind, LAYOUT, cache)
    blocks = assign_blocks(SCENARIO, NUM_BLOCKS - 2, seed=2)
    for r in SCENARIO:
        rx.expect(r.rid, blocks[r.rid])
    rx.expect(CUT_RID, [NUM_BLOCKS - 2, NUM_BLOCKS - 1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    peer = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.kv_transfer.kvt_helpers", kind, json.dumps(rx.address)],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for r in SCENARIO:
            assert wait_terminal(rx, r.rid, TIMEOUT_S) is S.DONE, rx.error(r.rid)
            want = pages_for(LAYOUT, r.rid, r.num_pages)
            assert torch.equal(cache.kv[:, blocks[r.rid]].view(torch.uint8), want.view(torch.uint8))
        wait_until(lambda: rx.poll(CUT_RID) is S.TRANSFERRING, TIMEOUT_S, "the unfinished request's chunk")
        peer.stdin.write(ending + "\n")
        peer.stdin.flush()
        # the sender went away with CUT_RID unfinished (killed, or closed cleanly): fail it
        assert wait_terminal(rx, CUT_RID, TIMEOUT_S) is S.FAILED
        _, err = peer.communicate(timeout=TIMEOUT_S)
        assert peer.returncode == (3 if ending == "die" else 0), err
        # ... saying why (the book prefixes every error with the request id: that alone says nothing)
        prefix = f"request {CUT_RID!r}: transfer stream broke: "
        error = rx.error(CUT_RID)
        assert error.startswith(prefix), error
        why = error.removeprefix(prefix)
        if ending == "exit":
            assert why == "sender closed the connection without finishing", error
        assert why, error
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        rx.close()
