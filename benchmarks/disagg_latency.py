"""Disaggregated (1 prefill + 1 decode worker) vs colocated (2 mixed workers) serving on Ray.

    .venv/bin/python benchmarks/disagg_latency.py            # ~8 min on 2 CPU cores
    .venv/bin/python benchmarks/disagg_latency.py --quick    # ~2-3 min smoke run (noisy)

ONE driver process starts one Ray instance and three Controllers side by side, every worker
a Ray actor with ``num_cpus=1`` (torch: 1 thread), all on a random-weight Llama
(``disagg_common.MODEL``):

    colocated      one "mixed" pool of 2 workers: each prefills and decodes its requests
    disagg         1 prefill + 1 decode worker, shm KV transfer, layer-wise (the default)
    disagg-whole   the same with ``TransferConfig(layerwise=False)``: whole cache at the end

Ray is told there are as many CPUs as actors (6) so all three stay loaded and measurements
interleave (drift of the shared machine hits every configuration alike); only one
configuration has work at any time, so at most 2 busy workers share the 2 physical cores.
Requests go through each controller's Router in-process (no frontend); the driver streams
tokens and timestamps each arrival.

Phase 1 - TTFT: one request at a time, prompt lengths ``--lengths``, ``--reps`` rounds; in
every round each length runs back to back on every configuration (order rotated per round).
Overhead of disaggregation = median over rounds of the paired ratio TTFT(disagg) /
TTFT(colocated) - 1. The second-token time is shown too: in the disagg path it includes the
KV hand-over that TTFT does not (the prefill worker returns the first token before the
transfer is done).

Phase 2 - load: Poisson arrivals at ``--rates`` req/s of prompts of ~``--prompt-len``
tokens (+-20 %) generating ``--output-len`` tokens each (greedy, ignore_eos); the same
prompts and arrival times for both topologies, run as two halves in ABBA order. Per rate
and topology: P99 inter-token latency (pooled gaps between consecutive tokens of each
request), TTFT, TPOT, goodput = requests/s served with TTFT <= ``--ttft-slo`` and TPOT <=
``--tpot-slo`` (offered rate x SLO attainment). Routing is checked: every disagg request
must be SPLIT and every colocated one MIXED (the route counts are in the JSON).

Writes ``benchmarks/results/disagg_latency{,_quick}.{json,png}`` (plus ``*_traces.json``:
every token's arrival time of every load-phase request) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_description  # noqa: E402
from benchmarks.disagg_common import (  # noqa: E402
    LOAD_MODES,
    MODEL,
    TTFT_MODES,
    TimedInvoker,
    plot,
    random_prompt,
    run_poisson,
    run_request,
    serve_config,
    summarize_load,
    tables,
    take_rpc_times,
    trace_record,
)
from cluster.control.controller import Controller, ControllerOptions  # noqa: E402
from engine.models.tiny import build_tiny_checkpoint  # noqa: E402

TOPOLOGIES = {"colocated": ("colocated", True), "disagg": ("disagg", True), "disagg-whole": ("disagg", False)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- cluster


async def start_controllers(model: str, chunk: int) -> dict[str, Controller]:
    ctrls: dict[str, Controller] = {}
    opts = ControllerOptions(health_interval_s=2.0, ping_timeout_s=10.0)
    for name, (topology, layerwise) in TOPOLOGIES.items():
        cfg = serve_config(model, topology, layerwise, chunk)
        c = Controller(cfg, opts, progress=lambda m, n=name: log(f"{n}: {m.strip()}"))
        ctrls[name] = await c.start()
        c.route_reasons = Counter()  # which path each placement took (checked per run)
        route = c.router.policy.route

        def recording(*a, _route=route, _c=c, **kw):
            decision = _route(*a, **kw)
            _c.route_reasons[decision.reason.value] += 1
            return decision

        c.router.policy.route = recording
        c.rpc_times = {}  # "<pool role>.<method>" -> seconds of each router -> worker call
        for entry in c.router.workers.values():
            entry.handle.invoker = TimedInvoker(entry.handle.invoker, entry.role, c.rpc_times)
    return ctrls


async def quiesce(c: Controller, timeout: float = 60.0) -> None:
    """Until every worker has no running request and its whole KV pool free."""
    deadline = time.monotonic() + timeout
    for rec in c.workers.values():
        while True:
            load = (await rec.handle.stats()).engine
            if load.running_requests == 0 and load.free_kv_blocks == load.total_kv_blocks:
                break
            if time.monotonic() > deadline:
                log(f"warning: {rec.worker_id} not idle after {timeout}s: {load}")
                break
            await asyncio.sleep(0.05)


def take_reasons(c: Controller) -> dict[str, int]:
    out = dict(c.route_reasons)
    c.route_reasons.clear()
    return out


# ---------------------------------------------------------------- phase 1: TTFT


async def phase_ttft(ctrls: dict[str, Controller], lengths: list[int], reps: int, vocab: int) -> dict:
    rng = random.Random(1)
    log(f"phase 1 (TTFT): warm-up round, then {reps} rounds x {len(lengths)} lengths x {len(TTFT_MODES)} modes")
    for length in lengths:  # warm-up: first calls of each shape pay one-off allocation costs
        for mode in TTFT_MODES:
            tr = await run_request(ctrls[mode].router, f"warm-{mode}-{length}", random_prompt(rng, length, vocab), 4)
            if not tr.ok:
                raise RuntimeError(f"warm-up request on {mode} failed: {tr.error or tr.finish_reason}")
    for c in ctrls.values():
        take_reasons(c)
        take_rpc_times(c)
    samples = {m: {L: {"ttft": [], "second": []} for L in lengths} for m in TTFT_MODES}
    for rep in range(reps):
        for length in lengths:
            k = rep % len(TTFT_MODES)
            for mode in TTFT_MODES[k:] + TTFT_MODES[:k]:
                await quiesce(ctrls[mode])
                tr = await run_request(
                    ctrls[mode].router, f"t{rep}-{mode}-{length}", random_prompt(rng, length, vocab), 4
                )
                if not tr.ok:
                    raise RuntimeError(f"request {tr.rid} failed: {tr.error or tr.finish_reason}")
                samples[mode][length]["ttft"].append(tr.ttft)
                samples[mode][length]["second"].append(tr.second_token)
        row = ", ".join(
            f"{L}: " + "/".join(f"{samples[m][L]['ttft'][-1] * 1e3:.0f}" for m in TTFT_MODES) for L in lengths
        )
        log(f"  round {rep + 1}/{reps} TTFT ms ({'/'.join(TTFT_MODES)}) {row}")
    reasons = {m: take_reasons(ctrls[m]) for m in TTFT_MODES}
    rpc = {m: take_rpc_times(ctrls[m]) for m in TTFT_MODES}
    summary = []
    for length in lengths:
        base = samples["colocated"][length]
        row = {"prompt_len": length}
        for m in TTFT_MODES:
            s = samples[m][length]
            row[m] = {
                "ttft_median_s": statistics.median(s["ttft"]),
                "ttft_min_s": min(s["ttft"]),
                "ttft_max_s": max(s["ttft"]),
                "second_token_median_s": statistics.median(s["second"]),
                # paired (same round, back to back) ratios against the colocated run
                "ttft_overhead_pct": 100 * (statistics.median(a / b for a, b in zip(s["ttft"], base["ttft"])) - 1),
                "ttft_overhead_of_min_pct": 100 * (min(s["ttft"]) / min(base["ttft"]) - 1),
                "second_token_overhead_pct": 100
                * (statistics.median(a / b for a, b in zip(s["second"], base["second"])) - 1),
            }
        summary.append(row)
    return {"samples": samples, "summary": summary, "route_reasons": reasons, "rpc": rpc}


# ---------------------------------------------------------------- phase 2: load


async def ticker(traces_done: list[int], total: int, label: str) -> None:
    while True:
        await asyncio.sleep(10)
        log(f"    {label}: {traces_done[0]}/{total} requests finished")


async def phase_load(ctrls: dict[str, Controller], args: argparse.Namespace, vocab: int) -> tuple[list, dict]:
    """Per rate: the same prompts and arrival times for both topologies, run as two halves in
    ABBA order (A first half, B first half, B second half, A second half; A alternates by
    rate) so slow drift of the shared machine's background load cancels to first order."""
    results, raw = [], {}
    for mode in LOAD_MODES:  # forget the warm-up requests
        take_reasons(ctrls[mode])
        take_rpc_times(ctrls[mode])
    n = args.requests
    log(f"phase 2 (load): rates {args.rates} req/s, {n} requests each (2 halves, ABBA), "
        f"prompts ~{args.prompt_len}, out {args.output_len}")  # fmt: skip
    for i, rate in enumerate(args.rates):
        rng = random.Random(100 + i)
        lo, hi = int(args.prompt_len * 0.8), int(args.prompt_len * 1.2)
        prompts = [random_prompt(rng, rng.randint(lo, hi), vocab) for _ in range(n)]
        gaps = [0.0] + [rng.expovariate(rate) for _ in range(n - 1)]
        halves = [(0, n // 2), (n // 2, n)]
        a, b = LOAD_MODES if i % 2 == 0 else LOAD_MODES[::-1]
        segments: dict[str, list] = {a: [], b: []}
        loads: dict[str, list[float]] = {a: [], b: []}
        for mode, (lo_i, hi_i) in ((a, halves[0]), (b, halves[0]), (b, halves[1]), (a, halves[1])):
            c = ctrls[mode]
            await quiesce(c)
            loads[mode].append(os.getloadavg()[0])
            label = f"rate {rate:g} {mode} requests {lo_i}-{hi_i - 1}"
            done = [0]
            tick = asyncio.create_task(ticker(done, hi_i - lo_i, label))
            try:
                seg_gaps = [0.0] + gaps[lo_i + 1 : hi_i]
                t0 = time.perf_counter()
                traces = await run_poisson_counting(
                    c.router, prompts[lo_i:hi_i], seg_gaps, args.output_len, f"r{i}-{mode}-{lo_i}", done
                )
            finally:
                tick.cancel()
            segments[mode].append(traces)
            raw.setdefault(f"{rate:g}", {}).setdefault(mode, []).append([trace_record(t, t0) for t in traces])
            log(f"  {label}: done in {max(t.end for t in traces) - t0:.0f} s (load avg {loads[mode][-1]:.1f})")
        for mode in LOAD_MODES:
            c = ctrls[mode]
            s = summarize_load(segments[mode], rate, args.ttft_slo, args.tpot_slo)
            s.update(mode=mode, route_reasons=take_reasons(c), rpc=take_rpc_times(c), load_avg_1min=loads[mode])
            expected = "split" if mode == "disagg" else "mixed"
            s["routing_ok"] = set(s["route_reasons"]) == {expected}
            if not s["routing_ok"]:  # e.g. a prefill worker marked unhealthy -> local prefill fallback
                log(f"  WARNING: {mode} requests were not all routed {expected!r}: {s['route_reasons']}")
            results.append(s)
            log(
                f"  rate {rate:g} {mode}: ITL p99 {s['itl_p99_s'] * 1e3:.0f} ms, gaps > TPOT SLO "
                f"{s['itl_over_slo_pct']:.1f} %, TTFT p50 {s['ttft_p50_s']:.2f} s, TPOT {s['tpot_mean_s'] * 1e3:.0f} ms, "
                f"goodput {s['goodput_rps']:.2f} req/s ({s['completed']}/{n} ok, routes {s['route_reasons']})"
            )
            rpc = ", ".join(f"{k} p50 {v['p50_ms']:.0f} / p99 {v['p99_ms']:.0f} ms" for k, v in s["rpc"].items())
            log(f"    router calls: {rpc}")
    return results, raw


async def run_poisson_counting(router, prompts, gaps, out_len, tag, done: list[int]):
    """``run_poisson`` whose finished-request count is visible to the ticker."""

    class Counting:
        def generate(self, spec):
            async def gen():
                try:
                    async for chunk in router.generate(spec):
                        yield chunk
                finally:
                    done[0] += 1

            return gen()

    return await run_poisson(Counting(), prompts, gaps, out_len, tag)


# ---------------------------------------------------------------- main


async def amain(args: argparse.Namespace, model: str, vocab: int) -> tuple[dict, list[dict], dict, dict]:
    ctrls = await start_controllers(model, args.chunk)
    try:
        infos = {n: [(w.worker_id, w.role) for w in c.info().workers] for n, c in ctrls.items()}
        log(f"workers: {infos}")
        ttft = await phase_ttft(ctrls, args.lengths, args.reps, vocab)
        for m in LOAD_MODES:  # every worker of the load topologies runs once concurrently first
            await asyncio.gather(
                *(run_request(ctrls[m].router, f"warm2-{m}-{j}", random_prompt(random.Random(j), 1024, vocab), 8)
                  for j in range(2))
            )  # fmt: skip
        load, raw = await phase_load(ctrls, args, vocab)
        return ttft, load, raw, infos
    finally:
        log("shutting the controllers down")
        await asyncio.gather(*(c.shutdown() for c in ctrls.values()), return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, rates and requests (~2-3 min)")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 2048])
    ap.add_argument("--reps", type=int, help="TTFT rounds (default 9, quick 3)")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], help="req/s, comma-separated")
    ap.add_argument("--requests", type=int, help="requests per rate and topology (default 24, quick 8)")
    ap.add_argument("--prompt-len", type=int, default=1500)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ttft-slo", type=float, default=3.0, help="seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.1, help="seconds")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens of every engine")
    ap.add_argument("--checkpoints", default="/tmp/splitserve_bench", help="where the random checkpoint is cached")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default="", help="suffix of the output file names (a variant run)")
    args = ap.parse_args()
    args.reps = args.reps or (3 if args.quick else 9)
    args.rates = args.rates or ([0.4, 0.7, 1.0] if args.quick else [0.25, 0.5, 0.75, 1.0])
    args.requests = args.requests or (8 if args.quick else 24)

    import ray

    torch.set_num_threads(1)  # the driver only routes and timestamps
    t_start = time.perf_counter()
    machine = machine_description()
    load_avg = {"start": os.getloadavg()}
    log(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, load average {load_avg['start']}")
    model = build_tiny_checkpoint(os.path.join(args.checkpoints, "disagg-llama"), "llama", **MODEL)
    n_actors = sum(p.num_workers for t, lw in TOPOLOGIES.values() for p in serve_config(model, t, lw).pools)
    ray.init(num_cpus=n_actors, include_dashboard=False, log_to_driver=False, object_store_memory=300 << 20)
    try:
        ttft, load, raw, infos = asyncio.run(amain(args, model, MODEL["vocab_size"]))
    finally:
        ray.shutdown()
    load_avg["end"] = os.getloadavg()

    table = tables(ttft, load, args)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "disagg_latency" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/disagg_latency.py", *sys.argv[1:]]),
        "machine": machine,
        "load_average": load_avg,
        "model": MODEL,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "checkpoints", "tag")},
        "workers": infos,
        "ttft": ttft,
        "load": load,
        "wall_s": time.perf_counter() - t_start,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    # every token's arrival time of every load-phase request, for offline analysis
    (out / f"{stem}_traces.json").write_text(json.dumps(raw, separators=(",", ":")) + "\n")
    plot(ttft, load, args, out / f"{stem}.png")
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
