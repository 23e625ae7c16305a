"""Attention offload (Lamina) on one CPU machine: decode throughput of the model worker with
its attention on an attention worker over gloo or shared memory, one micro-batch vs
two-micro-batch rotation, and against plain (non-offloaded) decode, at equal total cores.

Model: SmolLM2-135M-Instruct (the real model, fp32; 30 layers, 9 q / 3 KV heads). A batch of
``--batch`` requests with ``--prompt``-token random prompts is prefilled, then ``--steps``
decode steps are timed (per-step wall time; TPOT = median step time, tokens/s = batch / it).

Modes, each in its own process tree, one torch thread per process:
  plain-1t     EngineCore, 1 thread                          (1 core)
  plain-2t     EngineCore, 2 threads                         (2 cores: equal total cores)
  offload-r1   model worker (1 thread) + attention shard process (1 thread) over gloo,
               one micro-batch: model and shard take turns      (2 cores)
  offload-r2   same, two micro-batches rotated                 (2 cores)
  shm-r1/r2    as offload-r1/r2, the group over shared memory (group_transport "shm",
               engine/runtime/shm_group.py) instead of gloo's loopback TCP (2 cores)
  loop-r1/r2   the shard on a thread of the model worker's process (LoopbackTransport,
               threaded), one thread each: the rotation schedule without gloo's per-message
               cost (2 cores)

Run:  .venv/bin/python benchmarks/attention_offload.py            # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"
TIMEOUT_S = 300.0


def _config(model_dir: str, blocks: int):
    from engine.llm import build_engine_config

    return build_engine_config(model_dir, enable_prefix_caching=False, num_blocks=blocks, native_kernels=None)


def _spec(rank: int, port: int, backend: str):
    from engine.runtime.groups import GroupSpec

    return GroupSpec("attn-bench", rank, 2, HOST, port, backend, TIMEOUT_S, local_host=HOST)  # type: ignore[arg-type]


def shard_main(model_dir: str, blocks: int, port: int, backend: str) -> None:
    import torch

    from attention_offload.build import build_shard
    from attention_offload.dist_transport import serve_shard
    from engine.runtime.groups import join_communicator

    torch.set_num_threads(1)
    shard = build_shard(_config(model_dir, blocks), blocks, "sdpa")
    comm = join_communicator(_spec(1, port, backend))
    serve_shard(comm, shard)
    comm.close()


def _drive(engine: Any, batch: int, prompt: int, steps: int, seed: int) -> list[float]:
    """Prefill ``batch`` random prompts, then time ``steps`` decode steps -> step seconds."""
    import random

    from engine.request import Request, SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    reqs = [Request(f"r{i}", [rng.randrange(100, 40000) for _ in range(prompt)], params) for i in range(batch)]
    for r in reqs:
        engine.add_request(r)
    while not all(r.output_token_ids for r in reqs):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_work():
        engine.step()
    return times


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp

    import torch

    from engine.runtime.groups import free_port

    blocks = -(-(args.prompt + args.steps + 4) // 16) * args.batch + 8
    cfg = _config(args.model_dir, blocks)
    if mode.startswith("plain"):
        from engine.engine import EngineCore

        torch.set_num_threads(2 if mode == "plain-2t" else 1)
        engine = EngineCore(cfg)
        times = _drive(engine, args.batch, args.prompt, args.steps, args.seed)
        return {"mode": mode, "step_s": times}
    from attention_offload.build import build_loopback, shard_layout
    from attention_offload.dist_transport import DistAttentionTransport
    from attention_offload.offloaded import OffloadedEngine
    from engine.runtime.groups import join_communicator

    torch.set_num_threads(1)
    if mode.startswith("loop"):
        engine = build_loopback(cfg, [blocks], rotation=2 if mode == "loop-r2" else 1, backend="sdpa")
        stats = engine.core.model.rotation_stats
        times = _drive(engine, args.batch, args.prompt, args.steps, args.seed)
        c = engine.transport.counters
        engine.transport.close()
        exposed = stats.wait_s / (stats.compute_s + stats.wait_s) if stats.runs else None
        return {
            "mode": mode,
            "step_s": times,
            "payload_bytes": c.payload_out + c.payload_in,
            "exposed_wait_fraction": exposed,
        }
    port = free_port(HOST)
    backend = "shm" if mode.startswith("shm") else "gloo"
    proc = mp.get_context("spawn").Process(target=shard_main, args=(args.model_dir, blocks, port, backend))
    proc.start()
    try:
        comm = join_communicator(_spec(0, port, backend))
        transport = DistAttentionTransport(comm, [1], shard_layout(cfg))
        rotation = 2 if mode.endswith("-r2") else 1
        engine = OffloadedEngine(cfg, transport, [blocks], rotation)
        before = transport.counters.payload_out + transport.counters.payload_in
        stats = engine.core.model.rotation_stats
        times = _drive(engine, args.batch, args.prompt, args.steps, args.seed)
        payload = transport.counters.payload_out + transport.counters.payload_in - before
        transport.close()
        comm.close()
    finally:
        proc.join(timeout=60)
    exposed = stats.wait_s / (stats.compute_s + stats.wait_s) if stats.runs else None
    return {"mode": mode, "step_s": times, "payload_bytes": payload, "exposed_wait_fraction": exposed}


def _paired(runs: list[dict[str, Any]], mode: str, base: str) -> float | None:
    """Median over rounds of (base's step time / mode's step time) within the same round:
    a throughput ratio that cancels the load drifting between rounds."""
    ratios = []
    for rnd in sorted({r["round"] for r in runs}):
        by_mode = {r["mode"]: statistics.median(r["step_s"]) for r in runs if r["round"] == rnd}
        if mode in by_mode and base in by_mode:
            ratios.append(by_mode[base] / by_mode[mode])
    return statistics.median(ratios) if ratios else None


def summarise(runs: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    out = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        tpot = statistics.median(statistics.median(r["step_s"]) for r in rs)
        exposed = [r["exposed_wait_fraction"] for r in rs if r.get("exposed_wait_fraction") is not None]
        out.append(
            {
                "mode": mode,
                "tpot_ms": 1e3 * tpot,
                "tokens_per_s": batch / tpot,
                "exposed_wait_fraction": statistics.median(exposed) if exposed else None,
                "vs_plain_2t": _paired(runs, mode, "plain-2t"),
                "vs_r1": _paired(runs, mode, mode[:-1] + "1") if mode.endswith("-r2") else None,
            }
        )
    return out


def table(summary: list[dict[str, Any]]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows = [
        "| mode | TPOT ms | tokens/s | vs plain-2t (paired) | r2 vs r1 (paired) | exposed wait |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        rows.append(
            f"| {s['mode']} | {s['tpot_ms']:.1f} | {s['tokens_per_s']:.1f} | {f(s['vs_plain_2t'], '.2f')} | "
            f"{f(s['vs_r1'], '.2f')} | {f(s['exposed_wait_fraction'], '.2f')} |"
        )
    return "\n".join(rows)


def plot(summary: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    modes = [s["mode"] for s in summary]
    ax.bar(
        modes,
        [s["tokens_per_s"] for s in summary],
        color=["#999", "#666", "#6a9fd4", "#1f5fa8", "#e0a060", "#b86010", "#9bd49b", "#2e8b2e"][: len(modes)],
    )
    ax.set_ylabel("decode tokens/s (higher is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="plain-1t,plain-2t,offload-r1,offload-r2,shm-r1,shm-r2,loop-r1,loop-r2")
    ap.add_argument("--out", default="attention_offload")
    args = ap.parse_args()

    from benchmarks.common import RESULTS_DIR, machine_description
    from tests.real_model import real_model_dir

    args.model_dir = real_model_dir()
    load_start = os.getloadavg()
    runs = []
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            r = run_mode(mode, args)
            r["round"], r["load_avg"] = rnd, os.getloadavg()
            runs.append(r)
            print(
                f"round {rnd} {mode}: median step {1e3 * statistics.median(r['step_s']):.1f} ms, load {r['load_avg']}"
            )
    load_end = os.getloadavg()
    summary = summarise(runs, args.batch)
    print(table(summary))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "benchmarks/attention_offload.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "batch": args.batch,
        "prompt": args.prompt,
        "steps": args.steps,
        "rounds": args.rounds,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "summary": summary,
        "runs": runs,
    }
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    plot(summary, f"SmolLM2-135M decode, batch {args.batch}, context ~{args.prompt}", RESULTS_DIR / f"{args.out}.png")
    print(f"load average start {load_start}, end {load_end}; wrote {RESULTS_DIR / args.out}.{{json,png}}")


if __name__ == "__main__":
    main()
