"""KV transfer bandwidth per transport vs a plain memcpy of the same pages.

    .venv/bin/python benchmarks/kv_transfer_bandwidth.py [--mib 64] [--iters 5] [--kinds shm,torch,grpc]
        [--sender-opts '{"shm": {"window_bytes": 16777216}}'] [--receiver-opts '{"shm": {...}}']
        [--out benchmarks/results/kv_transfer_bandwidth.json]

The receivers (each with its own PagedKVCache) live in this process; each sender is this
script re-run as a child process (``--role sender``), so every transport except "loopback"
(in-process by design) crosses a process boundary. The sender's pages live in a shared
PagedKVCache (``shared=True``, as a prefill worker on the shm transport has) and go out with
``send_blocks``: by reference on shm (the receiver copies them straight out of the sender's
cache, one copy), copied out first on the other transports. One timed transfer = one
request of ``--mib`` MiB of pages, sent one layer (one chunk) at a time, from the parent's
"go" until the receiver polls DONE: it includes the sender's checksum (and copy-out, where
there is one), the transport, and the receiver's verification and copy into its cache.

Baselines, ``src`` and ``dst`` shaped like the cache pages ``[L, n, 2, block_size, Hkv, D]``:
"plain memcpy" is ``np.copyto(dst, src)``, one glibc memcpy on one thread (the target: a
one-copy transfer moves every byte once, verified on the way); "torch copy_" is
``dst.copy_(src)`` on torch's intra-op threads (all of this machine's cores).

Contention probe (after the rows, not a bound): the plain memcpy timed alone and while
another process (``--role hasher``) makes xxh3 passes over its own buffer of the same size,
which is what a sender's checksum does next to a receiver's copy on a 2-core machine; and the
fused one-pass copy+hash (``copy_with_checksum``) alone.

The machine is shared and noisy, so all rows are measured in the same run with equal
repetitions, interleaved: every repetition times the memcpy, torch's copy, a checksum pass
and one transfer per transport, once each, in an order that rotates between repetitions.
Each row reports the median of its ``--iters`` repetitions (and the best), after one
warm-up repetition (page faults, lazy connections).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.kv_cache.layout import KVLayout  # noqa: E402
from engine.kv_cache.paged_cache import PagedKVCache  # noqa: E402
from kv_transfer import TransferStatus, make_receiver, make_sender  # noqa: E402
from kv_transfer.bytes_ops import (  # noqa: E402
    checksum_bytes,
    copy_pages_with_checksum,
    copy_with_checksum,
    tensor_bytes,
    warm_native,
)

# a Llama-8B-like page: 16 tokens x 8 KV heads x 128 dims x K,V in bf16 = 64 KiB
LAYOUT_ARGS = dict(dtype="bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)


def _layout() -> KVLayout:
    return KVLayout(**LAYOUT_ARGS)


def _pages_per_layer(layout: KVLayout, mib: int) -> int:
    return max(1, (mib << 20) // (layout.page_bytes * layout.num_layers))


def _source(layout: KVLayout, n: int) -> torch.Tensor:
    """Random pages: [L, n, 2, block_size, Hkv, D]."""
    return torch.randn((layout.num_layers, n, *layout.page_shape)).to(layout.torch_dtype)


def _source_cache(layout: KVLayout, n: int) -> PagedKVCache:
    """The sender's cache: n random pages per layer in a shared (memfd) PagedKVCache."""
    cache = PagedKVCache(layout, n, shared=True)
    cache.kv.copy_(_source(layout, n))
    return cache


def _hasher(mib: int) -> None:
    """Child: hash a private ``mib`` MiB buffer over and over until stdin closes."""
    buf = np.random.default_rng(0).integers(0, 255, mib << 20, dtype=np.uint8)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        checksum_bytes(buf)


def _memcpy_beside_hasher(s_np: np.ndarray, d_np: np.ndarray, mib: int, tries: int) -> float:
    """Median seconds of the memcpy while another process hashes a ``mib`` MiB buffer."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--role", "hasher", "--mib", str(mib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        return statistics.median(_once(lambda: np.copyto(d_np, s_np))[0] for _ in range(tries))
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def _ceiling(s_np: np.ndarray, d_np: np.ndarray, mib: int, tries: int) -> dict:
    """Median seconds of: memcpy alone; memcpy while another process hashes ``mib`` MiB
    (DRAM traffic, as a sender's checksum) or 1 MiB (cache-resident: no DRAM traffic, only
    the other core busy); the fused copy+hash alone (numpy/xxhash pieces, and the native
    one-pass kernel used by the shm receiver when it is built)."""
    med = lambda fn: statistics.median(_once(fn)[0] for _ in range(tries))  # noqa: E731
    alone = med(lambda: np.copyto(d_np, s_np))
    fused = med(lambda: copy_with_checksum(d_np, s_np))
    rows_s, rows_d = s_np.reshape(-1, 1 << 16), d_np.reshape(-1, 1 << 16)
    ids = list(range(rows_s.shape[0]))
    native = med(lambda: copy_pages_with_checksum(rows_d, ids, rows_s, ids)) if warm_native() else None
    return {
        "memcpy_alone_s": alone,
        "memcpy_while_hashing_s": _memcpy_beside_hasher(s_np, d_np, mib, tries),
        "memcpy_beside_cache_resident_hash_s": _memcpy_beside_hasher(s_np, d_np, 1, tries),
        "fused_copy_hash_s": fused,
        "native_copy_hash_s": native,
    }


def _sender(kind: str, address, mib: int, opts: dict) -> None:
    """Child: connect, then on each "go RID" line stream one request; "cpu" prints this
    process's CPU seconds; "exit" closes."""
    layout = _layout()
    src = _source_cache(layout, _pages_per_layer(layout, mib))
    blocks = list(range(src.num_blocks))
    tx = make_sender(kind, layout, **opts)
    tx.connect(address)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "exit":
            break
        if cmd == "cpu":  # CPU seconds of this process so far (asked before and after a transfer)
            print(time.process_time(), flush=True)
            continue
        rid = rest[0]
        for layer in range(layout.num_layers):
            tx.send_blocks(rid, layer, 0, src, blocks)
        tx.finish(rid, layout.num_layers)
    tx.close()


class _Pair:
    """One transport's receiver (here) and sender (a child process, or here for loopback)."""

    def __init__(self, kind: str, mib: int, tx_opts: dict, rx_opts: dict):
        self.kind = kind
        self.layout = layout = _layout()
        self.n = _pages_per_layer(layout, mib)
        self.cache = PagedKVCache(layout, self.n)
        self.rx = make_receiver(kind, layout, self.cache, **rx_opts)
        self.child = self.tx = None
        if kind == "loopback":
            self.tx = make_sender(kind, layout, **tx_opts)
            self.tx.connect(self.rx.address)
            self.src = _source_cache(layout, self.n)
        else:
            argv = ["--role", "sender", "--kind", kind, "--address", json.dumps(self.rx.address), "--mib", str(mib)]
            self.child = subprocess.Popen(
                [sys.executable, __file__, *argv, "--sender-opts", json.dumps({kind: tx_opts})],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            if self.child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{kind} sender did not start")

    def transfer(self, rid: str, timeout: float = 120.0) -> tuple[float, float]:
        """(wall seconds from "go" to the receiver polling DONE, CPU seconds of both sides)."""
        layers = self.layout.num_layers
        self.rx.expect(rid, list(range(self.n)))
        child_cpu0 = self._child_cpu()
        cpu0, t0 = time.process_time(), time.perf_counter()
        if self.tx is not None:
            blocks = list(range(self.n))
            for layer in range(layers):
                self.tx.send_blocks(rid, layer, 0, self.src, blocks)
            self.tx.finish(rid, layers)
        else:
            self.child.stdin.write(f"go {rid}\n")
            self.child.stdin.flush()
        deadline = t0 + timeout
        while (st := self.rx.poll(rid)) is not TransferStatus.DONE:
            if st is TransferStatus.FAILED:
                raise RuntimeError(self.rx.error(rid))
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{rid} not DONE after {timeout}s")
            time.sleep(0.0002)
        secs, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        cpu += self._child_cpu() - child_cpu0  # DONE here: the sender's work is over too
        self.rx.cancel(rid)
        return secs, cpu

    def _child_cpu(self) -> float:
        if self.child is None:
            return 0.0
        self.child.stdin.write("cpu\n")
        self.child.stdin.flush()
        return float(self.child.stdout.readline())

    def close(self) -> None:
        if self.tx is not None:
            self.tx.close()
        if self.child is not None:
            self.child.stdin.write("exit\n")
            self.child.stdin.flush()
            self.child.wait(timeout=60)
        self.rx.close()


def _best(fn, tries: int = 3) -> tuple[float, float]:
    """(best wall seconds, least CPU seconds of all threads) of ``fn()``."""
    best = cpu = float("inf")
    for _ in range(tries):
        wall, c = _once(fn)
        best, cpu = min(best, wall), min(cpu, c)
    return best, cpu


def _once(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads) of one ``fn()``."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=15, help="measured repetitions of every row (median reported)")
    ap.add_argument("--kinds", default="loopback,shm,torch,grpc")
    ap.add_argument("--sender-opts", default="{}", help="JSON {kind: {make_sender option: value}}")
    ap.add_argument("--receiver-opts", default="{}", help="JSON {kind: {make_receiver option: value}}")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kv_transfer_bandwidth.json"))
    ap.add_argument("--role", default="bench", choices=["bench", "sender", "hasher"])
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tx_opts, rx_opts = json.loads(args.sender_opts), json.loads(args.receiver_opts)
    if args.role == "hasher":
        _hasher(args.mib)
        return
    if args.role == "sender":
        address = json.loads(args.address)
        _sender(
            args.kind, tuple(address) if isinstance(address, list) else address, args.mib, tx_opts.get(args.kind, {})
        )
        return

    load_start = os.getloadavg()  # the machine is shared: recorded with the results
    layout = _layout()
    n = _pages_per_layer(layout, args.mib)
    nbytes = n * layout.num_layers * layout.page_bytes
    kinds = args.kinds.split(",")
    src, dst = _source(layout, n), torch.empty((layout.num_layers, n, *layout.page_shape), dtype=layout.torch_dtype)
    s_np, d_np = tensor_bytes(src).numpy(), tensor_bytes(dst).numpy()
    plain, torch_copy = "plain memcpy (np.copyto, 1 thread)", f"torch copy_ ({torch.get_num_threads()} threads)"
    baselines = {plain: lambda: np.copyto(d_np, s_np), torch_copy: lambda: dst.copy_(src)}
    walls: dict[str, list[float]] = {name: [] for name in [*baselines, *kinds]}
    cpus: dict[str, list[float]] = {name: [] for name in walls}
    hashes: list[float] = []
    pairs = []
    try:
        for kind in kinds:
            pairs.append(_Pair(kind, args.mib, tx_opts.get(kind, {}), rx_opts.get(kind, {})))
        jobs = [(name, fn) for name, fn in baselines.items()] + [(p.kind, p) for p in pairs]
        for i in range(args.iters + 1):  # 0: warm-up
            times = {}
            for name, job in jobs[i % len(jobs) :] + jobs[: i % len(jobs)]:  # rotated order
                time.sleep(0.02)  # let the intra-op pool stop spinning after torch's copy
                times[name] = job.transfer(f"bench-{i}") if isinstance(job, _Pair) else _once(job)
            h = _once(lambda: checksum_bytes(s_np))[0]
            if i > 0:
                for name, (wall, c) in times.items():
                    walls[name].append(wall)
                    cpus[name].append(c)
                hashes.append(h)
    finally:
        for p in pairs:
            p.close()
    best = {k: statistics.median(v) for k, v in walls.items()}  # the median repetition of each row
    fastest = {k: min(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    hash1 = statistics.median(hashes)
    ceiling = _ceiling(s_np, d_np, args.mib, args.iters)
    header = (
        f"{nbytes / 2**20:.0f} MiB of KV pages ({layout.num_layers} layers x {n} pages of {layout.page_bytes // 1024} KiB, "
        f"one chunk per layer); median of {args.iters} interleaved repetitions per row; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    print(f"\n{header}\n")
    print(
        "| transport | processes | median time (ms) | best (ms) | GB/s (median) | vs plain memcpy | vs torch copy_ "
        "| CPU (ms, all threads) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, secs in best.items():
        where = "in-process" if name in (*baselines, "loopback") else "2 processes"
        row = {
            "transport": name,
            "processes": where,
            "ms": secs * 1e3,
            "best_ms": fastest[name] * 1e3,
            "gb_per_s": nbytes / secs / 1e9,
            "vs_plain_memcpy": best[plain] / secs,
            "vs_torch_copy": best[torch_copy] / secs,
            "cpu_ms": cpu[name] * 1e3,
        }
        rows.append(row)
        print(
            f"| {name} | {where} | {row['ms']:.1f} | {row['best_ms']:.1f} | {row['gb_per_s']:.2f} | {row['vs_plain_memcpy']:.3f} "
            f"| {row['vs_torch_copy']:.3f} | {row['cpu_ms']:.1f} |"
        )
    print(
        f"\nOne thread: memcpy {nbytes / best[plain] / 1e9:.2f} GB/s, checksum (xxh3) {nbytes / hash1 / 1e9:.2f} GB/s. "
        "A one-copy transfer (shm by reference) moves every byte once on the receiver, hashing it on the way, "
        "while the sender hashes it in place."
    )
    native = ceiling["native_copy_hash_s"]
    print(
        f"Contention probe (not a bound; medians): memcpy alone {ceiling['memcpy_alone_s'] * 1e3:.1f} ms, while "
        f"another process hashes {args.mib} MiB {ceiling['memcpy_while_hashing_s'] * 1e3:.1f} ms, or 1 MiB (in "
        f"cache) {ceiling['memcpy_beside_cache_resident_hash_s'] * 1e3:.1f} ms; fused copy+hash alone: numpy/xxhash "
        f"{ceiling['memcpy_alone_s'] / ceiling['fused_copy_hash_s']:.2f}x of memcpy, native "
        + (f"{ceiling['memcpy_alone_s'] / native:.2f}x." if native else "not built.")
    )
    load = os.getloadavg()
    print(
        f"Load average (1, 5, 15 min) at the start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"at the end {' '.join(f'{x:.2f}' for x in load)}."
    )
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "description": header,
        "mib": args.mib,
        "iters": args.iters,
        "layout": LAYOUT_ARGS,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "checksum_gb_per_s": nbytes / hash1 / 1e9,
        "rows": rows,
        "contention_probe": ceiling,
        "load_average_start": load_start,
        "load_average_end": load,
        "repetitions": {k: [round(x * 1e3, 3) for x in v] for k, v in walls.items()},  # ms, in order
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
