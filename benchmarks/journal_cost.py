"""What journaling every token costs: the in-memory state store vs Redis (a local redis-server).

    .venv/bin/python benchmarks/journal_cost.py              # ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/journal_cost.py --quick      # ~1 min smoke run
    .venv/bin/python benchmarks/journal_cost.py --real       # end to end on SmolLM2 too

Two measurements, both side by side with the in-memory store (the default, the baseline):

1. store: ``journal_tokens`` of one token awaited (the router writes every chunk before the
   client sees it: write-ahead), by ``--writers`` concurrent streams, each appending
   ``--appends`` times. Per store and concurrency: µs per token of wall time (throughput
   cost; the Redis writer batches what queues during a round trip into one pipeline) and the
   median latency one append adds to its stream.
2. end to end: ``Router.generate`` on a LocalCluster (1 prefill + 1 decode worker, loopback
   KV transfer), greedy, ``--output-len`` tokens per request, concurrency 1 and 8, rounds
   alternating the stores on the same cluster (the store is swapped between rounds), so
   drift of the shared machine hits both alike. ms/token per round; the Redis overhead is
   paired with the memory store's round next to it; medians over rounds.

A redis-server is started on a free port (no persistence). The load average is recorded
before and after. Writes ``benchmarks/results/journal_cost{,_quick}.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_store(kind: str, url: str, prefix: str):
    from cluster.config import StateConfig
    from cluster.control.state import InMemoryStateStore
    from cluster.control.state.redis_store import RedisStateStore

    if kind == "memory":
        return InMemoryStateStore(StateConfig(memory_max_records=100_000))
    return RedisStateStore(StateConfig(redis_url=url, key_prefix=prefix))


# ---------------------------------------------------------------- 1. the store alone
async def store_round(kind: str, url: str, writers: int, appends: int) -> dict:
    from cluster.control.state import JournalSpec
    from engine.request import SamplingParams

    store = make_store(kind, url, f"bench{time.monotonic_ns()}")
    await store.start()
    try:
        params = SamplingParams(max_tokens=appends)
        for w in range(writers):
            await store.journal_start(JournalSpec(f"w{w}", f"w{w}", (1, 2, 3), params, "router", time.time()))
        latencies: list[float] = []

        async def writer(w: int) -> None:
            for i in range(appends):
                t = time.perf_counter()
                await store.journal_tokens(f"w{w}", i, [i % 50000])
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        wall = time.perf_counter() - t0
        assert store.health().ok, store.health()
        return {"us_per_token": wall / (writers * appends) * 1e6, "p50_latency_us": statistics.median(latencies) * 1e6}
    finally:
        await store.close()


# ---------------------------------------------------------------- 2. end to end
async def e2e(model: str, engine: dict, url: str, output_len: int, rounds: int, prompts: list[list[int]]) -> list:
    from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
    from cluster.control.local import LocalCluster
    from engine.request import SamplingParams
    from engine.types import RequestSpec

    cfg = ServeConfig(
        model=model,
        pools=(PoolConfig("prefill", "prefill", 1, engine=engine), PoolConfig("decode", "decode", 1, engine=engine)),
        router=RouterConfig(short_prompt_threshold=1),
        transfer=TransferConfig(kind="loopback"),
    )
    cluster = await LocalCluster(cfg).start()
    stores = {kind: make_store(kind, url, f"e2e{kind}") for kind in ("memory", "redis")}
    for s in stores.values():
        await s.start()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    seq = iter(range(10**9))
    out = []
    try:

        async def one(prompt: list[int]) -> int:
            n = 0
            async for chunk in cluster.router.generate(RequestSpec(f"q{next(seq)}", prompt, params)):
                n += len(chunk.token_ids)
            return n

        async def round_(kind: str, concurrency: int) -> float:
            cluster.router.store = stores[kind]
            batch = prompts[:concurrency]
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(p) for p in batch)))
            return (time.perf_counter() - t0) / tokens * 1e3

        await round_("memory", 1)  # warm up (allocations, first shapes)
        for concurrency in (1, 8):
            for r in range(rounds):
                order = ("memory", "redis") if r % 2 == 0 else ("redis", "memory")
                ms = {kind: await round_(kind, concurrency) for kind in order}
                out.append({"concurrency": concurrency, "round": r, **{f"{k}_ms_per_token": v for k, v in ms.items()}})
        assert stores["redis"].health().ok
    finally:
        for s in stores.values():
            await s.close()
        await cluster.stop()
    return out


def summarize_e2e(rows: list[dict]) -> list[dict]:
    table = []
    for concurrency in sorted({r["concurrency"] for r in rows}):
        rs = [r for r in rows if r["concurrency"] == concurrency]
        mem = statistics.median(r["memory_ms_per_token"] for r in rs)
        red = statistics.median(r["redis_ms_per_token"] for r in rs)
        over = statistics.median((r["redis_ms_per_token"] - r["memory_ms_per_token"]) * 1e3 for r in rs)
        ratio = statistics.median(r["redis_ms_per_token"] / r["memory_ms_per_token"] for r in rs)
        table.append(
            {
                "concurrency": concurrency,
                "memory_ms_per_token": mem,
                "redis_ms_per_token": red,
                "redis_overhead_us_per_token": over,
                "ratio": ratio,
                "rounds": len(rs),
            }  # fmt: skip
        )
    return table


def plot(result: dict, path: Path) -> None:
    """Left: the store alone, µs of wall time per journaled token by concurrent writers.
    Right: end to end, Redis over in-memory ms/token per model and concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind in ("memory", "redis"):
        rows = [r for r in result["store"] if r["store"] == kind]
        a.plot([r["writers"] for r in rows], [r["us_per_token"] for r in rows], marker="o", label=kind)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("concurrent streams")
    a.set_ylabel("us of wall time per journaled token")
    a.set_title("the store alone", fontsize=9)
    a.legend(fontsize=8)
    labels, ratios = [], []
    for name, e in result.get("e2e", {}).items():
        for t in e["table"]:
            labels.append(f"{name.removesuffix('-Instruct')}\nc={t['concurrency']}")
            ratios.append(t["ratio"])
    b.bar(range(len(ratios)), ratios)
    b.axhline(1.0, color="black", linewidth=0.8)
    b.set_xticks(range(len(ratios)), labels, fontsize=7)
    b.set_ylabel("Redis / in-memory, ms per token")
    b.set_title("end to end (Router, LocalCluster)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--real", action="store_true", help="end to end on SmolLM2-135M-Instruct as well")
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--appends", type=int, default=2000)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an earlier run's results")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    if args.quick:
        args.appends, args.rounds, args.output_len = 300, 2, 32
    from benchmarks.common import RESULTS_DIR, machine_description

    load_before = os.getloadavg()
    from tests.redis_server import RedisServer, benchmark_redis_binary

    redis = RedisServer(binary=benchmark_redis_binary())
    url = redis.url
    result: dict = {"machine": machine_description(), "load_before": load_before}
    tiny_dir = None
    try:
        store_rows = []
        for writers in args.writers:
            for kind in ("memory", "redis"):
                r = asyncio.run(store_round(kind, url, writers, args.appends))
                store_rows.append({"store": kind, "writers": writers, **r})
                print(f"store {kind:6s} writers {writers:3d}: {r['us_per_token']:7.1f} us/token, "
                      f"append latency p50 {r['p50_latency_us']:7.1f} us", flush=True)  # fmt: skip
        result["store"] = store_rows
        from engine.models.tiny import build_tiny_checkpoint

        rng = random.Random(0)
        prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(16, 48))] for _ in range(8)]
        tiny_dir = Path(tempfile.mkdtemp(prefix="journal-cost-"))
        models = {"tiny-llama": (build_tiny_checkpoint(tiny_dir / "tiny", family="llama"), {
            "block_size": 16, "num_blocks": 256})}  # fmt: skip
        if args.real:
            from cluster.model_store import fetch_model
            from engine.models.gguf import resolve_model_path

            models["SmolLM2-135M-Instruct"] = (resolve_model_path(fetch_model()), {"num_blocks": 256})
        for name, (path, engine) in models.items():
            rows = asyncio.run(e2e(str(path), engine, url, args.output_len, args.rounds, prompts))
            table = summarize_e2e(rows)
            result.setdefault("e2e", {})[name] = {"rounds": rows, "table": table}
            for t in table:
                print(f"e2e {name} concurrency {t['concurrency']}: memory {t['memory_ms_per_token']:.3f} ms/token, "
                      f"redis {t['redis_ms_per_token']:.3f} ms/token, overhead {t['redis_overhead_us_per_token']:+.0f} "
                      f"us/token ({t['ratio']:.3f}x)", flush=True)  # fmt: skip
    finally:
        redis.close()
        if tiny_dir is not None:
            shutil.rmtree(tiny_dir, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {result['load_after'][0]:.2f}")
    out = RESULTS_DIR / f"journal_cost{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
