"""Does the simulator agree with the real cluster? Profile, serve, calibrate, predict, compare.

    .venv/bin/python benchmarks/sim_validation.py            # ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/sim_validation.py --quick    # ~3 min smoke run

1. Profile this machine: ``cluster.tools.profile.profile_engine`` on a random-weight Llama
   (``MODEL``: 4 layers, hidden 256) with one torch thread, what each Ray worker gets.
2. Real runs: a Ray ``Controller`` with 1 prefill + 1 decode worker (``num_cpus=1`` each,
   shm KV transfer, layer-wise), requests driven in-process through ``router.generate``
   with Poisson arrivals at each of ``--rates`` (one run per rate, fresh seeds); lengths
   from the shipped Azure conversation excerpt scaled by ``--scale`` (the model is ~100x
   smaller than the trace's) and clipped. The driver timestamps every token.
3. Simulation of the same requests (arrival times, lengths) with the same pools, router
   config and engine limits on the profiled table:
   - "profiled": the table as measured, no overheads;
   - "calibrated": two constants fitted on the FIRST run only, then used unchanged to
     predict the others: ``token_overhead_s`` (serving cost per decoding request per step:
     every token is streamed to the driver by a Ray call that the decode actor's process
     serves next to its engine loop; fitted so the TPOT p50 matches) and ``dispatch_s``
     (routing and Ray-call time added to every request, so the TTFT p50 matches).
4. TTFT / TPOT / E2E percentiles per run and the relative error (sim - real) / real. The
   held-out runs (not the first) are the test of the simulator.
5. Planning example: ``sweep_ratio`` for 2000 instances on the shipped (illustrative) A100
   table, timed.

Writes ``benchmarks/results/sim_validation{,_quick}.json`` (plus the profiled table) and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_description  # noqa: E402
from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig  # noqa: E402
from cluster.tools.profile import profile_engine  # noqa: E402
from cluster.tools.sim.model import ProfileTable, StepTimeModel  # noqa: E402
from cluster.tools.sim.planner import sweep_ratio  # noqa: E402
from cluster.tools.sim.roofline import EXAMPLE_PATH  # noqa: E402
from cluster.tools.sim.simulator import LinkConfig, SimConfig, Simulator  # noqa: E402
from cluster.tools.sim.workload import Workload, load_trace, poisson  # noqa: E402
from engine.models.tiny import build_tiny_checkpoint  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from engine.types import RequestSpec  # noqa: E402

MODEL = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
ENGINE = dict(block_size=16, num_blocks=2048, max_num_batched_tokens=1024, max_num_seqs=64, enable_prefix_caching=False)
# jsq on both sides, every request split (no short path), no role switching: one path to model
ROUTER = RouterConfig(prefill_policy="jsq", decode_policy="jsq", short_prompt_threshold=0, max_mixed_workers=0)
SHM = LinkConfig(bandwidth_gbps=40.0, latency_s=1e-3, layerwise=True)  # in-host copy; ~1 ms of RPCs
QUANTS = (50, 90, 99)
METRICS = ("ttft", "tpot", "e2e")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else math.nan


# ---------------------------------------------------------------- real cluster


async def one_request(router, rid: str, prompt: list[int], max_tokens: int) -> dict:
    sent = time.perf_counter()
    times: list[float] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for chunk in router.generate(RequestSpec(rid, prompt, params)):
        now = time.perf_counter()
        times += [now] * len(chunk.token_ids)
        if chunk.error:
            raise RuntimeError(f"{rid}: {chunk.error}")
    if len(times) != max_tokens:
        raise RuntimeError(f"{rid}: {len(times)} tokens, expected {max_tokens}")
    return {"sent": sent, "first": times[0], "last": times[-1], "n": len(times)}


async def poisson_run(router, work: Workload, tag: str, rng: random.Random) -> dict:
    """Send ``work`` open-loop at its arrival times; per-request TTFT, TPOT, E2E (seconds)."""
    prompts = [[rng.randrange(3, MODEL["vocab_size"]) for _ in range(p)] for p in work.prompt_lens]
    t0 = time.perf_counter()
    tasks = []
    for i, (at, o) in enumerate(zip(work.arrival_s, work.output_lens)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(router, f"{tag}-{i}", prompts[i], o)))
    res = await asyncio.gather(*tasks)
    return {
        "ttft": [r["first"] - r["sent"] for r in res],
        "tpot": [(r["last"] - r["first"]) / (r["n"] - 1) for r in res if r["n"] > 1],
        "e2e": [r["last"] - r["sent"] for r in res],
        "wall_s": time.perf_counter() - t0,
        "send_lag_p99_s": pct([r["sent"] - t0 - at for r, at in zip(res, work.arrival_s)], 99),
    }


async def run_real(model: str, works: list[Workload], seed: int) -> list[dict]:
    import ray

    from cluster.control.controller import Controller, ControllerOptions

    cfg = ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", 1, num_cpus=1.0, engine=dict(ENGINE)),
            PoolConfig("decode", "decode", 1, num_cpus=1.0, engine=dict(ENGINE)),
        ),
        router=ROUTER,
        transfer=TransferConfig(kind="shm", layerwise=True, timeout_s=120.0),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        max_queue=4096,
    )
    rng = random.Random(seed)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    c = Controller(cfg, ControllerOptions(health_interval_s=5.0, ping_timeout_s=30.0), progress=lambda m: None)
    out = []
    try:
        await c.start()
        log("cluster up; warm-up")
        for i, n in enumerate((64, 256, 16, 512)):
            await one_request(c.router, f"warm-{i}", [rng.randrange(3, 2048) for _ in range(n)], 6)
        for k, work in enumerate(works):
            log(f"run {k}: {len(work)} Poisson requests at {work.mean_rate:.2f} req/s")
            r = await poisson_run(c.router, work, f"run{k}", rng)
            r["load_average_1m"] = os.getloadavg()[0]
            out.append(r)
    finally:
        await c.shutdown()
        ray.shutdown()
    return out


# ---------------------------------------------------------------- simulation and comparison


def simulate(table: ProfileTable, work: Workload, token_s: float, dispatch_s: float) -> dict:
    cfg = SimConfig(
        num_prefill=1,
        num_decode=1,
        router=ROUTER,
        link=SHM,
        num_blocks=ENGINE["num_blocks"],
        block_size=ENGINE["block_size"],
        max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
        max_num_seqs=ENGINE["max_num_seqs"],
        dispatch_s=dispatch_s,
    )
    r = Simulator(StepTimeModel(table, token_overhead_s=token_s), cfg).run(work)
    a = r.arrays()
    return {"ttft": a["ttft"].tolist(), "tpot": a["tpot"][a["output"] > 1].tolist(), "e2e": a["e2e"].tolist()}


def calibrate(table: ProfileTable, work: Workload, real: dict) -> tuple[float, float]:
    """(token_overhead_s, dispatch_s) so the simulated TPOT p50 and TTFT p50 match ``real``:
    bisection on the overhead (TPOT grows with it), then the TTFT gap as dispatch time."""
    target = pct(real["tpot"], 50)
    lo, hi = 0.0, 0.05
    if pct(simulate(table, work, 0.0, 0.0)["tpot"], 50) >= target:
        hi = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if pct(simulate(table, work, mid, 0.0)["tpot"], 50) < target:
            lo = mid
        else:
            hi = mid
    o = (lo + hi) / 2
    d = 0.0
    for _ in range(3):  # dispatch delays arrivals only: a couple of rounds settle it
        d = max(0.0, d + pct(real["ttft"], 50) - pct(simulate(table, work, o, d)["ttft"], 50))
    return o, d


def compare(real: dict, sim: dict) -> dict:
    out = {}
    for metric in METRICS:
        for q in QUANTS:
            rv, sv = pct(real[metric], q), pct(sim[metric], q)
            out[f"{metric}_p{q}"] = {"real_s": rv, "sim_s": sv, "rel_err": (sv - rv) / rv}
    return out


def table_md(rows: dict[str, dict]) -> str:
    cols = list(rows)
    head = "| metric | real (ms) | " + " | ".join(f"{c} (ms) | err" for c in cols) + " |"
    lines = [head, "|---" * (2 + 2 * len(cols)) + "|"]
    first = rows[cols[0]]
    for key in first:
        cells = [key, f"{first[key]['real_s'] * 1e3:.1f}"]
        for c in cols:
            v = rows[c][key]
            cells += [f"{v['sim_s'] * 1e3:.1f}", f"{v['rel_err']:+.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_example() -> dict:
    model = StepTimeModel(ProfileTable.load(EXAMPLE_PATH))
    t0, c0 = time.perf_counter(), time.process_time()
    plan = sweep_ratio(model, 2000, 3000.0, load_trace("conversation"), slo_ttft_s=1.0, slo_tpot_s=0.05)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    b = plan.best
    log(f"plan: {b.num_prefill}:{b.num_decode} in {wall:.1f} s wall ({cpu:.1f} s CPU), {plan.simulations} simulations")
    return {
        "command": "splitserve sim --workload conversation --sweep-ratio --instances 2000 --target-rate 3000 "
        "--slo-ttft 1000 --slo-tpot 50",
        "best": {"num_prefill": b.num_prefill, "num_decode": b.num_decode, "attainment": b.attainment},
        "p90_ttft_s": b.ttft_p90_s,
        "p90_tpot_s": b.tpot_p90_s,
        "simulations": plan.simulations,
        "wall_s": wall,
        "cpu_s": cpu,
        "notes": plan.notes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, smaller profile grid")
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 3.0, 1.0], help="req/s; the first calibrates")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    ap.add_argument("--scale", type=float, default=0.25, help="trace prompt and output lengths x this")
    ap.add_argument("--max-prompt", type=int, default=1000)
    ap.add_argument("--max-output", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plan", action="store_true", help="skip the planning example")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    duration = args.duration or (20.0 if args.quick else 40.0)
    model = build_tiny_checkpoint(
        os.path.join(os.path.expanduser("~"), ".cache", "splitserve", "simval-llama"), family="llama", **MODEL
    )
    trace = load_trace("conversation").scaled_lengths(args.scale, args.scale).clipped(args.max_prompt, args.max_output)
    works = [poisson(trace, r, duration_s=duration, seed=args.seed + i) for i, r in enumerate(args.rates)]

    log("profiling this machine (1 torch thread)")
    t0 = time.perf_counter()
    table = profile_engine(
        model,
        prefill_tokens=(16, 64, 128, 256, 512, 1024),
        batch_sizes=(1, 2, 4, 8, 16) if args.quick else (1, 2, 4, 8, 12, 16, 24),
        context_lens=(32, 128, 512) if args.quick else (32, 128, 256, 512, 1024),
        reps=3 if args.quick else 5,
        decode_steps=6 if args.quick else 10,
        block_size=ENGINE["block_size"],
        num_blocks=ENGINE["num_blocks"],
        max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
        max_num_seqs=ENGINE["max_num_seqs"],
    )
    profile_s = time.perf_counter() - t0
    log(f"profiled in {profile_s:.0f} s")
    tag = "_quick" if args.quick else ""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    table.save(RESULTS_DIR / f"sim_validation_profile{tag}.json")

    reals = asyncio.run(run_real(model, works, args.seed))
    o, d = calibrate(table, works[0], reals[0])
    log(f"calibrated on run 0: {o * 1e3:.2f} ms per streamed token per step, dispatch {d * 1e3:.1f} ms")
    runs = []
    for i, (work, real) in enumerate(zip(works, reals)):
        rows = {
            "profiled": compare(real, simulate(table, work, 0.0, 0.0)),
            "calibrated": compare(real, simulate(table, work, o, d)),
        }
        role = "calibration run" if i == 0 else "held-out run"
        print(f"\n### run {i} ({role}): {len(work)} requests at {args.rates[i]:g} req/s\n\n{table_md(rows)}\n")
        runs.append(
            {
                "rate": args.rates[i],
                "requests": len(work),
                "mean_prompt": statistics.fmean(work.prompt_lens),
                "mean_output": statistics.fmean(work.output_lens),
                "held_out": i > 0,
                "real_wall_s": real["wall_s"],
                "send_lag_p99_s": real["send_lag_p99_s"],
                "load_average_1m_after": real["load_average_1m"],
                "comparison": rows,
                "real": {m: real[m] for m in METRICS},  # per request, seconds
            }
        )
    held = [r["comparison"]["calibrated"] for r in runs if r["held_out"]]
    mean_abs = {key: statistics.fmean(abs(h[key]["rel_err"]) for h in held) for key in held[0]} if held else {}
    if mean_abs:
        print(
            "mean |error| over held-out runs (calibrated): " + ", ".join(f"{k_} {v:.0%}" for k_, v in mean_abs.items())
        )
    result = {
        "machine": machine_description(),
        "load_average_1m_before": load_before,
        "args": vars(args),
        "profile_s": profile_s,
        "token_overhead_s": o,
        "dispatch_s": d,
        "runs": runs,
        "held_out_mean_abs_rel_err": mean_abs,
    }
    if not args.no_plan:
        result["plan_example"] = plan_example()
    out = RESULTS_DIR / f"sim_validation{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
