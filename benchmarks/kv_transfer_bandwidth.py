"""KV transfer bandwidth per transport vs a plain torch memcpy of the same bytes.

    .venv/bin/python benchmarks/kv_transfer_bandwidth.py [--mib 64] [--iters 3] [--kinds shm,torch,grpc]

The receiver (with its PagedKVCache) lives in this process; the sender is this script
re-run as a child process (``--role sender``), so every transport except "loopback"
(in-process by design) crosses a process boundary. One timed transfer = one request of
``--mib`` MiB of pages, sent one layer (one chunk) at a time, from the parent's "go" until
the receiver polls DONE: it includes the sender's crc32, the transport, and the receiver's
verification and copy into the cache. Prints a markdown table (best of ``--iters``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.kv_cache.layout import KVLayout  # noqa: E402
from engine.kv_cache.paged_cache import PagedKVCache  # noqa: E402
from kv_transfer import TransferStatus, make_receiver, make_sender  # noqa: E402

# a Llama-8B-like page: 16 tokens x 8 KV heads x 128 dims x K,V in bf16 = 64 KiB
LAYOUT_ARGS = dict(dtype="bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)


def _layout() -> KVLayout:
    return KVLayout(**LAYOUT_ARGS)


def _pages_per_layer(layout: KVLayout, mib: int) -> int:
    return max(1, (mib << 20) // (layout.page_bytes * layout.num_layers))


def _sender(kind: str, address, mib: int) -> None:
    """Child: connect, then on each "go RID" line stream one request; "exit" closes."""
    layout = _layout()
    n = _pages_per_layer(layout, mib)
    src = torch.randn((layout.num_layers, n, *layout.page_shape)).to(layout.torch_dtype)
    tx = make_sender(kind, layout)
    tx.connect(address)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "exit":
            break
        rid = rest[0]
        for layer in range(layout.num_layers):
            tx.send(rid, layer, 0, src[layer])
        tx.finish(rid, layout.num_layers)
    tx.close()


def _wait_done(rx, rid: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (st := rx.poll(rid)) is not TransferStatus.DONE:
        if st is TransferStatus.FAILED:
            raise RuntimeError(rx.error(rid))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rid} not DONE after {timeout}s")
        time.sleep(0.0002)


def _bench_transport(kind: str, mib: int, iters: int) -> float:
    """Best seconds for one ``mib`` MiB request over ``kind``."""
    layout = _layout()
    n = _pages_per_layer(layout, mib)
    cache = PagedKVCache(layout, n)
    rx = make_receiver(kind, layout, cache)
    child = tx_local = None
    try:
        if kind == "loopback":
            tx_local = make_sender(kind, layout)
            tx_local.connect(rx.address)
            src = torch.randn((layout.num_layers, n, *layout.page_shape)).to(layout.torch_dtype)
        else:
            child = subprocess.Popen(
                [sys.executable, __file__, "--role", "sender", "--kind", kind, "--address", json.dumps(rx.address), "--mib", str(mib)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{kind} sender did not start")
        best = float("inf")
        for i in range(iters + 1):  # +1 warm-up (first-touch page faults, lazy connections)
            rid = f"bench-{i}"
            rx.expect(rid, list(range(n)))
            t0 = time.perf_counter()
            if tx_local is not None:
                for layer in range(layout.num_layers):
                    tx_local.send(rid, layer, 0, src[layer])
                tx_local.finish(rid, layout.num_layers)
            else:
                child.stdin.write(f"go {rid}\n")
                child.stdin.flush()
            _wait_done(rx, rid)
            if i > 0:
                best = min(best, time.perf_counter() - t0)
            rx.cancel(rid)
        return best
    finally:
        if tx_local is not None:
            tx_local.close()
        if child is not None:
            child.stdin.write("exit\n")
            child.stdin.flush()
            child.wait(timeout=60)
        rx.close()


def _bench_memcpy(mib: int, iters: int) -> float:
    src = torch.randn((mib << 20) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touch both buffers
    best = float("inf")
    for _ in range(max(iters, 5)):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--kinds", default="loopback,shm,torch,grpc")
    ap.add_argument("--role", default="bench", choices=["bench", "sender"])
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "sender":
        address = json.loads(args.address)
        _sender(args.kind, tuple(address) if isinstance(address, list) else address, args.mib)
        return

    layout = _layout()
    nbytes = _pages_per_layer(layout, args.mib) * layout.num_layers * layout.page_bytes
    memcpy_s = _bench_memcpy(args.mib, args.iters)
    rows = [("torch memcpy (dst.copy_(src))", "in-process", memcpy_s)]
    for kind in args.kinds.split(","):
        rows.append(
            (kind, "in-process" if kind == "loopback" else "2 processes", _bench_transport(kind, args.mib, args.iters))
        )
    print(f"\n{nbytes / 2**20:.0f} MiB of KV pages ({layout.num_layers} layers x {nbytes // layout.num_layers // layout.page_bytes} pages of {layout.page_bytes // 1024} KiB, one chunk per layer); "
          f"best of {args.iters}; torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads\n")  # fmt: skip
    print("| transport | processes | time (ms) | GB/s | vs memcpy |")
    print("|---|---|---:|---:|---:|")
    for name, where, secs in rows:
        print(f"| {name} | {where} | {secs * 1e3:.1f} | {nbytes / secs / 1e9:.2f} | {memcpy_s / secs:.3f} |")


if __name__ == "__main__":
    main()
