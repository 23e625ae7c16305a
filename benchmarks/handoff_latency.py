"""KV hand-off latency of disaggregated serving: whole-cache vs layer-wise transfer (issue 11).

    .venv/bin/python benchmarks/handoff_latency.py              # ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/handoff_latency.py --quick      # ~2 min (256/1024, 3 rounds)

TTFT cannot show what the KV transfer costs: the prefill worker publishes the first token
when the prompt is done, before (whole-cache) or while (layer-wise) its KV moves. What the
transfer delays is the decode worker's first step, so this measures, per request:

    hand-off     the prefill worker's end of the prompt -> the start of the decode worker's
                 first decode step of the request (``WorkerStats.handoff_seconds``, the
                 ``splitserve_kv_handoff_seconds`` histogram: transfer tail, admission,
                 scheduling); read as the histogram's delta around each request
    1st -> 2nd   first token -> second token as the caller receives them (the hand-off plus
                 one decode step plus the router's hops)
    TTST         request sent -> second token

Setup: the real model (SmolLM2-135M-Instruct, fp32), two in-process LocalClusters side by
side, each 1 prefill + 1 decode worker over the shm transport (the one-node path), one with
``TransferConfig(layerwise=True)`` and one whole-cache. Prompts of ``--lengths`` random
tokens (fresh every request, prefix caching off), 3 new tokens, greedy, one request at a
time; every round runs each length on both clusters, the order alternating between rounds,
so drift of the shared machine hits both alike. Medians over ``--rounds``.

Writes ``benchmarks/results/handoff_latency{,_quick}.{json,png}`` and prints a markdown table.
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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_description  # noqa: E402
from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from engine.types import RequestSpec  # noqa: E402

MODES = ("layer-wise", "whole-cache")
BLOCK_SIZE = 16
CHUNK = 2048  # prefill token budget per step: a 2048-token prompt is one chunk
ENGINE = {"block_size": BLOCK_SIZE, "num_blocks": 640, "max_num_batched_tokens": CHUNK, "enable_prefix_caching": False}
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def config(model: str, layerwise: bool) -> ServeConfig:
    return ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=ENGINE),
            PoolConfig("decode", "decode", 1, engine=ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=0, max_mixed_workers=0),  # every request split
        transfer=TransferConfig(kind="shm", layerwise=layerwise, timeout_s=120.0),
    )


async def one_request(cluster, rid: str, prompt: list[int]) -> dict:
    """Run one request; its hand-off (from the decode worker's histogram delta) and the times
    of its first two tokens as the caller receives them."""
    decode = cluster.workers["decode-0"]
    before = decode.stats().handoff_seconds
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async for chunk in cluster.router.generate(RequestSpec(rid, prompt, PARAMS)):
        now = time.perf_counter()
        arrivals += [now] * len(chunk.token_ids)
        if chunk.error is not None:
            raise RuntimeError(f"{rid}: {chunk.error}")
    after = decode.stats().handoff_seconds
    if after.count != before.count + 1:
        raise RuntimeError(f"{rid}: the decode worker measured {after.count - before.count} hand-offs, not 1")
    return {
        "handoff_s": after.sum - before.sum,
        "first_to_second_s": arrivals[1] - arrivals[0],
        "ttft_s": arrivals[0] - t0,
        "ttst_s": arrivals[1] - t0,
    }


async def run(args: argparse.Namespace, model: str) -> list[dict]:
    from cluster.control.local import LocalCluster

    clusters = {}
    for mode in MODES:
        clusters[mode] = await LocalCluster(config(model, layerwise=mode == "layer-wise")).start()
    rng = random.Random(args.seed)
    rows = []
    try:
        # warm-up: the first requests of a worker pay one-time costs (kernel dispatch, shm maps)
        for mode, c in clusters.items():
            for n in (64, max(args.lengths)):
                await one_request(c, f"warm-{mode}-{n}", [rng.randrange(3, 49152) for _ in range(n)])
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for n in args.lengths:
                for mode in order:
                    prompt = [rng.randrange(3, 49152) for _ in range(n)]  # fresh: no prefix hits anywhere
                    load = os.getloadavg()[0]
                    m = await one_request(clusters[mode], f"r{r}-{n}-{mode}", prompt)
                    rows.append({"round": r, "prompt_tokens": n, "mode": mode, "load": load, **m})
                    print(
                        f"  round {r} {n:5d} tokens {mode:11s}: hand-off {m['handoff_s'] * 1e3:7.1f} ms, "
                        f"1st->2nd {m['first_to_second_s'] * 1e3:7.1f} ms, TTFT {m['ttft_s'] * 1e3:7.0f} ms  "
                        f"(load {load:.1f})",
                        flush=True,
                    )
    finally:
        for c in clusters.values():
            await c.stop()
    return rows


def summarize(rows: list[dict], lengths: list[int]) -> list[dict]:
    out = []
    for n in lengths:
        for mode in MODES:
            sel = [r for r in rows if r["prompt_tokens"] == n and r["mode"] == mode]
            out.append(
                {
                    "prompt_tokens": n,
                    "mode": mode,
                    "runs": len(sel),
                    **{
                        f"median_{k}": statistics.median(r[k] for r in sel)
                        for k in ("handoff_s", "first_to_second_s", "ttft_s", "ttst_s")
                    },
                }
            )
    return out


def kv_bytes(model_dir: str, tokens: int) -> int:
    from engine.config import ModelConfig

    cfg = ModelConfig.from_hf_dir(model_dir)
    return tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, fp32


def table(summary: list[dict], model_dir: str) -> str:
    lines = [
        "| prompt tokens | KV bytes | mode | hand-off (median) | 1st -> 2nd token | TTFT | TTST |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['prompt_tokens']} | {kv_bytes(model_dir, s['prompt_tokens']) / 2**20:.0f} MiB | {s['mode']} | "
            f"{s['median_handoff_s'] * 1e3:.1f} ms | {s['median_first_to_second_s'] * 1e3:.1f} ms | "
            f"{s['median_ttft_s'] * 1e3:.0f} ms | {s['median_ttst_s'] * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    xs = range(len(lengths))
    for ax, key, title in (
        (axes[0], "median_handoff_s", "hand-off: prefill end -> first decode step"),
        (axes[1], "median_first_to_second_s", "first -> second token (caller)"),
    ):
        for i, mode in enumerate(MODES):
            vals = [
                next(s[key] for s in summary if s["prompt_tokens"] == n and s["mode"] == mode) * 1e3 for n in lengths
            ]
            ax.bar([x + (i - 0.5) * width for x in xs], vals, width, label=mode)
        ax.set_xticks(list(xs), [str(n) for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms (median)")
        ax.set_title(title, fontsize=10)
        ax.legend()
    fig.suptitle("KV hand-off, SmolLM2-135M fp32, shm, 1 prefill + 1 decode worker (in process)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 and 1024 tokens, 3 rounds")
    ap.add_argument("--lengths", default="256,1024,2048", help="prompt lengths (tokens)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.rounds = "256,1024", 3
    args.lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)

    from cluster.model_store import fetch_model
    from engine.models.gguf import resolve_model_path

    model = resolve_model_path(fetch_model(progress=True))
    print(f"machine: {machine_description()}", flush=True)
    load_before = os.getloadavg()
    rows = asyncio.run(run(args, model))
    summary = summarize(rows, args.lengths)
    name = "handoff_latency_quick" if args.quick else "handoff_latency"
    result = {
        "machine": machine_description(),
        "args": vars(args),
        "engine": ENGINE,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "summary": summary,
        "rows": rows,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, args.lengths, RESULTS_DIR / f"{name}.png")
    print(table(summary, model))
    print(f"wrote {RESULTS_DIR / name}.json and .png")


if __name__ == "__main__":
    main()
