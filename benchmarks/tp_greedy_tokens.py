"""TP=2 decode steps: plain-greedy tokens from (max, id) pairs against gathering the logits.

    .venv/bin/python benchmarks/tp_greedy_tokens.py      # ~2 min
    # results: benchmarks/results/tp_greedy_tokens.json and .png

A tensor-parallel rank holds a slice of the vocabulary. Sampling used to all-gather every
rank's slice of the logits ([Vs, N] fp32 per rank: 6.3 MB per step at 64 rows and V = 49152)
so that every rank could take the argmax; a step whose rows are all plain greedy now gathers
one (max, id) pair per row and rank ([N, 2] float64, TPReductions.greedy_tokens). Two
in-process TP=2 engines (TPLeaderEngine + one TPFollower thread each, gloo over loopback)
with the same weights, one with ``greedy_head`` on (pairs) and one with it off (logits),
decode the same batch of prompts; their decode steps are timed interleaved, step by step, at
context ~160, and their tokens compared. The model: a random Llama of SmolLM2's width with
16 query / 8 KV heads (hidden 576, head_dim 36, intermediate 1536, vocab 49152, ``--layers``
layers, fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    TP_WIDTH,
    grouped_bars,
    machine_description,
    median,
    random_prompts,
    save_results,
)
from engine.llm import build_engine_config  # noqa: E402
from engine.models.tiny import build_tiny_checkpoint  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402
from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, build_tp_cores  # noqa: E402

WIDTH = TP_WIDTH | {"vocab_size": 49152}
VARIANTS = {"pairs": True, "logits": False}  # name -> greedy_head


def engines(ckpt: str) -> dict[str, tuple[TPLeaderEngine, TPFollower]]:
    out = {}
    for name, on in VARIANTS.items():
        config = build_engine_config(ckpt, enable_prefix_caching=False, num_blocks=1024, greedy_head=on)
        cores = build_tp_cores(config, 2, f"tp/greedy-{name}")
        follower = TPFollower(cores[1], f"tp/greedy-{name}#1")
        out[name] = (TPLeaderEngine(cores[0], [follower]), follower)
    return out


def steps(pair: dict[str, tuple[TPLeaderEngine, TPFollower]], batch: int, n: int) -> dict[str, Any]:
    prompts = random_prompts(batch, seed=batch)
    reqs: dict[str, list[Request]] = {}
    for name, (leader, _) in pair.items():
        reqs[name] = [
            Request(f"{name}-{batch}-{i}", p, SamplingParams(max_tokens=32 + n, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        for r in reqs[name]:
            leader.add_request(r)
        while any(len(r.output_token_ids) < 30 for r in reqs[name]):  # prefill, then context ~160
            leader.step()
    times: dict[str, list[float]] = {name: [] for name in pair}
    for _ in range(n):
        for name, (leader, _) in pair.items():
            t0 = time.perf_counter()
            leader.step()
            times[name].append(time.perf_counter() - t0)
    for leader, _ in pair.values():
        while leader.has_work():
            leader.step()
    same = sum(a.output_token_ids == b.output_token_ids for a, b in zip(reqs["pairs"], reqs["logits"], strict=True))
    return {"batch": batch, "same_sequences": same} | {f"{k}_step_ms": 1e3 * median(v) for k, v in times.items()}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | decode step, (max, id) pairs | logits gathered | ratio | sequences equal |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['pairs_step_ms']:.1f} ms | {r['logits_step_ms']:.1f} ms | "
            f"{r['pairs_step_ms'] / r['logits_step_ms']:.2f}x | {r['same_sequences']}/{r['batch']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    series = {
        "logits all-gathered": [r["logits_step_ms"] for r in rows],
        "(max, id) pairs all-gathered": [r["pairs_step_ms"] for r in rows],
    }
    grouped_bars(ax, [str(r["batch"]) for r in rows], series)
    ax.set_xlabel("batch")
    ax.set_ylabel("TP=2 decode step (ms, lower is better)")
    ax.set_title("Greedy sampling at TP=2 (2-core CPU, gloo)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": machine_description(), "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as d:
        print(f"building the {args.layers}-layer model ...", flush=True)
        ckpt = build_tiny_checkpoint(d, family="llama", num_hidden_layers=args.layers, **WIDTH)
        pair = engines(ckpt)
    try:
        res["rows"] = []
        for b in (int(x) for x in args.batches.split(",")):
            row = steps(pair, b, args.steps)
            print(
                f"  batch {b}: pairs {row['pairs_step_ms']:.1f} ms, logits {row['logits_step_ms']:.1f} ms", flush=True
            )
            res["rows"].append(row)
    finally:
        for _, follower in pair.values():
            follower.stop(10.0)
    res["load_after"] = os.getloadavg()[0]
    save_results(res, args.out, "tp_greedy_tokens", lambda path: plot(res["rows"], path), markdown(res["rows"]))


if __name__ == "__main__":
    main()
