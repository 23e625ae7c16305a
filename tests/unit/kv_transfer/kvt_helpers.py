"""Shared helpers for the kv_transfer tests, and the sender side of the cross-process tests.

Run as ``python -m tests.unit.kv_transfer.kvt_helpers KIND ADDRESS_JSON`` (from the repo
root): connects a sender of transport KIND, streams SCENARIO, then sends one chunk of
request ``CUT_RID`` and waits for a line on stdin; "exit" closes cleanly, "die" kills the
process without closing (the receiver must fail ``CUT_RID``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv_cache.layout import KVLayout
from kv_transfer import KVSender, TransferStatus, make_sender

# 256-byte pages; bfloat16 exercises the dtype <-> bytes views (numpy has no bfloat16)
LAYOUT = KVLayout("bfloat16", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
NUM_BLOCKS = 48
CUT_RID = "cut"


@dataclass(frozen=True)
class Req:
    rid: str
    num_pages: int
    prompt_chunks: tuple[int, ...]  # pages per prefill chunk; each yields one chunk per layer


SCENARIO = (Req("r0", 5, (2, 3)), Req("r1", 3, (3,)), Req("r2", 7, (1, 4, 2)))


def pages_for(layout: KVLayout, rid: str, num_pages: int) -> torch.Tensor:
    """Deterministic K/V of a request, the same in every process: [L, n, 2, bs, Hkv, D]."""
    gen = torch.Generator().manual_seed(zlib.crc32(rid.encode()))
    return torch.randn((layout.num_layers, num_pages, *layout.page_shape), generator=gen).to(layout.torch_dtype)


def chunk_plan(layout: KVLayout, req: Req) -> list[tuple[int, int, torch.Tensor]]:
    """(layer, first_page, pages) in prefill order: per prompt chunk, every layer."""
    src = pages_for(layout, req.rid, req.num_pages)
    plan, first = [], 0
    for n in req.prompt_chunks:
        plan += [(layer, first, src[layer, first : first + n].clone()) for layer in range(layout.num_layers)]
        first += n
    assert first == req.num_pages
    return plan


def send_requests(tx: KVSender, layout: KVLayout, reqs: tuple[Req, ...]) -> None:
    """Interleave the requests' chunks round-robin, finishing each after its last chunk."""
    plans = {r.rid: chunk_plan(layout, r) for r in reqs}
    sent = dict.fromkeys(plans, 0)
    while any(sent[rid] < len(p) for rid, p in plans.items()):
        for rid, plan in plans.items():
            if sent[rid] < len(plan):
                tx.send(rid, *plan[sent[rid]])
                sent[rid] += 1
                if sent[rid] == len(plan):
                    tx.finish(rid, len(plan))


def assign_blocks(reqs: tuple[Req, ...], num_blocks: int, seed: int = 0) -> dict[str, list[int]]:
    """Disjoint, shuffled destination blocks per request."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    out, at = {}, 0
    for r in reqs:
        out[r.rid], at = perm[at : at + r.num_pages], at + r.num_pages
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail loudly after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def wait_terminal(endpoint, rid: str, timeout: float = 15.0) -> TransferStatus:
    wait_until(lambda: endpoint.poll(rid).terminal, timeout, f"{rid} to finish on {type(endpoint).__name__}")
    return endpoint.poll(rid)


def _peer_main(kind: str, address_json: str) -> None:
    address = json.loads(address_json)
    tx = make_sender(kind, LAYOUT)
    tx.connect(tuple(address) if isinstance(address, list) else address)
    send_requests(tx, LAYOUT, SCENARIO)
    tx.send(CUT_RID, 0, 0, pages_for(LAYOUT, CUT_RID, 2)[0])  # never finished
    print("sent", flush=True)
    if sys.stdin.readline().strip() == "die":
        os._exit(3)  # no close(): the receiver sees the link drop mid-request
    tx.close()


if __name__ == "__main__":
    _peer_main(sys.argv[1], sys.argv[2])
