"""Per-token cost of serving through a frontend vs calling the Router in-process.

    .venv/bin/python benchmarks/frontend_overhead.py            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/frontend_overhead.py --quick    # ~30 s smoke run

ONE process hosts one LocalCluster (1 prefill + 1 decode worker, loopback KV transfer, a
tiny random-weight Llama from ``engine.models.tiny``) on an event loop thread. The same
prompts (token ids, all long enough for the split prefill -> decode path), greedy with
``ignore_eos`` so every request produces exactly ``--output-len`` tokens, go through every
path in FRONTENDS:

    router             ``Router.generate`` on the cluster's loop (the baseline: no frontend)
    backend            ``ServingBackend.generate`` (admission, deadline, detokenized deltas)
    grpc               the gRPC frontend through the SDK's streaming call, client in this
                       process (its message decoding shares the GIL with the workers)
    grpc-subprocess    the same SDK call from a separate client process (as in production)

Each path is a function ``(bench, prompts, concurrency) -> ([Trace], wall seconds)``
registered in FRONTENDS; adding a frontend (e.g. HTTP) is one more function. Rounds
interleave the paths (order rotated per round) so drift of the shared machine hits all of
them alike. Per path and concurrency: ms/token = wall time of the round / tokens generated
in it; overhead (µs/token) and ratio are paired with ``router``'s ms/token of the same
round; TTFT and TPOT (time per output token after the first) are per-request medians. Every
figure is the median over rounds.

Writes ``benchmarks/results/frontend_overhead{,_quick}.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Trace:
    """One request: seconds since its start at each token arrival."""

    arrivals: list[float] = field(default_factory=list)

    def add(self, t0: float, n: int) -> None:
        now = time.perf_counter() - t0
        self.arrivals.extend([now] * n)

    @property
    def ttft(self) -> float:
        return self.arrivals[0]

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.arrivals[-1] - self.arrivals[0]) / max(len(self.arrivals) - 1, 1)


# ---------------------------------------------------------------- client process mode
def client_main(target: str) -> None:
    """``--client TARGET``: read {"prompts", "concurrency", "max_tokens"} on stdin, stream each
    prompt through the SDK, print {"arrivals": [[seconds...] per prompt], "wall": seconds}."""
    from cluster.client import AsyncClient

    job = json.loads(sys.stdin.read())

    async def main() -> dict:
        async with AsyncClient(target) as c:
            await _sdk_round(c, job["prompts"][:1], 1, 2)  # connect before the clock starts
            t0 = time.perf_counter()
            traces = await _sdk_round(c, job["prompts"], job["concurrency"], job["max_tokens"])
            return {"arrivals": [t.arrivals for t in traces], "wall": time.perf_counter() - t0}

    print(json.dumps(asyncio.run(main())))


async def _sdk_round(client, prompts: list[list[int]], concurrency: int, max_tokens: int) -> list[Trace]:
    sem = asyncio.Semaphore(concurrency)

    async def one(p: list[int]) -> Trace:
        async with sem:
            tr, t0 = Trace(), time.perf_counter()
            async for ch in client.stream(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
                tr.add(t0, len(ch.token_ids))
            return tr

    return list(await asyncio.gather(*(one(p) for p in prompts)))


# ---------------------------------------------------------------- the served cluster
class Bench:
    def __init__(self, model: str, max_tokens: int):
        from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
        from cluster.control.local import LocalCluster
        from cluster.frontends.grpc_server import GrpcFrontend
        from cluster.frontends.service import ServingBackend

        self.max_tokens = max_tokens
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="bench-loop", daemon=True).start()
        engine = {"block_size": 16, "num_blocks": 512, "max_num_batched_tokens": 256}
        config = ServeConfig(
            model=model,
            pools=(
                PoolConfig("prefill", "prefill", 1, engine=engine),
                PoolConfig("decode", "decode", 1, engine=engine),
            ),
            router=RouterConfig(short_prompt_threshold=8),
            transfer=TransferConfig(kind="loopback"),
        )

        async def up():
            cluster = await LocalCluster(config).start()
            backend = ServingBackend.from_model_dir(cluster.router, model)
            grpc_fe = GrpcFrontend(backend)
            return cluster, backend, grpc_fe, await grpc_fe.start()

        self.cluster, self.backend, self.grpc_frontend, port = self.run(up())
        self.grpc_target = f"127.0.0.1:{port}"
        self._ids = 0

    def run(self, coro, timeout: float = 600.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def rid(self) -> str:
        self._ids += 1
        return f"bench-{self._ids}"

    def params(self):
        from engine.request import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)

    def close(self) -> None:
        self.run(self.grpc_frontend.stop(grace=0))
        self.cluster.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _bounded(prompts: list[list[int]], concurrency: int, one) -> list[Trace]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p):
        async with sem:
            return await one(p)

    return list(await asyncio.gather(*(guarded(p) for p in prompts)))


# ---------------------------------------------------------------- frontends
Round = tuple[list[Trace], float]  # traces, wall seconds of the whole round


def _timed_on_loop(b: Bench, prompts: list[list[int]], concurrency: int, one) -> Round:
    async def main() -> Round:
        t0 = time.perf_counter()
        traces = await _bounded(prompts, concurrency, one)
        return traces, time.perf_counter() - t0

    return b.run(main())


def run_router(b: Bench, prompts: list[list[int]], concurrency: int) -> Round:
    from engine.types import RequestSpec

    async def one(p: list[int]) -> Trace:
        tr, t0 = Trace(), time.perf_counter()
        async for chunk in b.cluster.router.generate(RequestSpec(b.rid(), p, b.params())):
            tr.add(t0, len(chunk.token_ids))
        return tr

    return _timed_on_loop(b, prompts, concurrency, one)


def run_backend(b: Bench, prompts: list[list[int]], concurrency: int) -> Round:
    async def one(p: list[int]) -> Trace:
        tr, t0 = Trace(), time.perf_counter()
        async for delta in b.backend.generate(p, b.params()):
            tr.add(t0, len(delta.token_ids))
        return tr

    return _timed_on_loop(b, prompts, concurrency, one)


def run_grpc(b: Bench, prompts: list[list[int]], concurrency: int) -> Round:
    from cluster.client import AsyncClient

    async def main() -> Round:
        async with AsyncClient(b.grpc_target) as c:
            await _sdk_round(c, prompts[:1], 1, 2)  # connect before the clock starts
            t0 = time.perf_counter()
            traces = await _sdk_round(c, prompts, concurrency, b.max_tokens)
            return traces, time.perf_counter() - t0

    return asyncio.run(main())  # the client's own loop, in this thread


def run_grpc_subprocess(b: Bench, prompts: list[list[int]], concurrency: int) -> Round:
    job = json.dumps({"prompts": prompts, "concurrency": concurrency, "max_tokens": b.max_tokens})
    cmd = [sys.executable, __file__, "--client", b.grpc_target]
    done = subprocess.run(cmd, input=job, capture_output=True, text=True, check=True, cwd=REPO)
    out = json.loads(done.stdout)
    return [Trace(a) for a in out["arrivals"]], out["wall"]


FRONTENDS: dict[str, Callable[[Bench, list[list[int]], int], Round]] = {
    "router": run_router,
    "backend": run_backend,
    "grpc": run_grpc,
    "grpc-subprocess": run_grpc_subprocess,
}
BASELINE = "router"


# ---------------------------------------------------------------- driver
def measure(b: Bench, prompts: list[list[int]], concurrency: int, rounds: int, names: list[str]) -> dict[str, dict]:
    """Per path: medians over rounds of ms/token, TTFT and TPOT, and the median over rounds of
    the paired difference and ratio to the baseline's ms/token in the same round."""
    per: dict[str, dict[str, list[float]]] = {n: {"ms_per_token": [], "ttft_ms": [], "tpot_ms": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            traces, wall = FRONTENDS[name](b, prompts, concurrency)
            tokens = sum(len(t.arrivals) for t in traces)
            assert tokens == len(prompts) * b.max_tokens, f"{name}: {tokens} tokens"
            per[name]["ms_per_token"].append(1e3 * wall / tokens)
            per[name]["ttft_ms"].append(1e3 * statistics.median(t.ttft for t in traces))
            per[name]["tpot_ms"].append(1e3 * statistics.median(t.tpot for t in traces))
    base = per[BASELINE]["ms_per_token"]
    out = {}
    for name, m in per.items():
        out[name] = {k: statistics.median(v) for k, v in m.items()}
        out[name]["overhead_us_per_token"] = 1e3 * statistics.median(x - y for x, y in zip(m["ms_per_token"], base))
        out[name]["ratio"] = statistics.median(x / y for x, y in zip(m["ms_per_token"], base))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: client process mode
    ap.add_argument("--quick", action="store_true", help="fewer prompts and rounds")
    ap.add_argument("--frontends", default=",".join(FRONTENDS), help="comma-separated subset of FRONTENDS")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated in-flight request counts")
    args = ap.parse_args()
    if args.client:
        client_main(args.client)
        return

    from benchmarks.common import RESULTS_DIR, machine_description
    from engine.models.tiny import build_tiny_checkpoint

    names = args.frontends.split(",")
    unknown = set(names) - set(FRONTENDS)
    if unknown or BASELINE not in names:
        ap.error(f"--frontends must include {BASELINE!r} and only names from {list(FRONTENDS)}")
    num_prompts, rounds = (4, 2) if args.quick else (8, 7)
    model = build_tiny_checkpoint(REPO / ".cache" / "bench_tiny_llama", family="llama")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(16, 48))] for _ in range(num_prompts)]
    b = Bench(str(model), args.output_len)
    try:
        for name in names:  # warm-up: first calls pay for lazy imports and connection set-up
            FRONTENDS[name](b, prompts[:2], 2)
        results = {}
        for conc in (int(c) for c in args.concurrency.split(",")):
            results[conc] = measure(b, prompts, conc, rounds, names)
    finally:
        b.close()

    command = "    .venv/bin/python benchmarks/frontend_overhead.py" + (" --quick" if args.quick else "")
    print(f"\n{command}\n")
    print(
        f"{num_prompts} prompts of 16-48 tokens x {args.output_len} output tokens, greedy; medians over {rounds} rounds\n"
    )
    print(f"| path | concurrency | ms/token | overhead µs/token | vs {BASELINE} | TTFT ms | TPOT ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for conc, per in results.items():
        for name, m in per.items():
            print(
                f"| {name} | {conc} | {m['ms_per_token']:.3f} | {m['overhead_us_per_token']:+.0f} | {m['ratio']:.2f}x "
                f"| {m['ttft_ms']:.1f} | {m['tpot_ms']:.2f} |"
            )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"frontend_overhead{'_quick' if args.quick else ''}.json"
    payload = {
        "command": command.strip(),
        "machine": machine_description(),
        "num_prompts": num_prompts,
        "output_len": args.output_len,
        "rounds": rounds,
        "results": {str(c): per for c, per in results.items()},
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
