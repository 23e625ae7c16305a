"""The layer-wise KV push of a TP=2 prefill worker: pages gathered during the step against after it.

    .venv/bin/python benchmarks/tp_kv_push.py            # ~2 min
    # results: benchmarks/results/tp_kv_push.json and .png

A TP prefill worker sends whole-head pages, so every layer's new pages are all-gathered over
the TP group. Before 2026-12-07 that gather ran after the step, for every layer at once (one
collective per request); now each layer's gather starts inside the step as soon as the layer
wrote its KV, overlapping the later layers (engine/kv_cache/step_gather.py). This times one
prompt's prefill on an in-process TP=2 engine (the TPLeaderEngine + TPFollower of LocalCluster:
two ranks as threads, a gloo group over loopback, 2 cores), each round running, in rotating
order, with a fresh prompt each:

- ``none``: the prefill steps alone (no KV push: the cost floor);
- ``after``: each step, then ``gather_kv`` of the step's new blocks, every layer (the old path);
- ``during``: each step with ``gather_kv=True``, then every layer's whole pages assembled
  (``StepKVPages.pages``, what the worker's push reads).

Reported per prompt length: the median of each mode, and the push's exposed cost (mode - none).
The model: a random-weight Llama of SmolLM2's width with 16 query / 8 KV heads (hidden 576,
head_dim 36, intermediate 1536, vocab 4096, ``--layers`` layers, fp32), prefix caching off,
one prefill chunk of up to 2048 tokens per step; TokenWeave at its default (from 2048 tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    TP_WIDTH,
    grouped_bars,
    machine_description,
    median,
    save_results,
)
from engine.llm import build_engine_config  # noqa: E402
from engine.models.tiny import build_tiny_checkpoint  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402
from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, build_tp_cores  # noqa: E402

MODES = ("none", "after", "during")
WIDTH = TP_WIDTH | {"vocab_size": 4096, "max_position_embeddings": 4096}


def prefill(leader: TPLeaderEngine, mode: str, tokens: list[int], rid: str) -> float:
    """Seconds to prefill ``tokens`` (prefill_only: the request ends once its prompt is done)."""
    leader.add_request(Request(rid, tokens, SamplingParams(max_tokens=1, temperature=0.0)))
    t0 = time.perf_counter()
    while leader.core.has_work():
        if mode == "during":
            result = leader.step(lambda layer, out: None)
            pages = leader.step_pages
            if pages is not None:
                for layer in range(leader.core.layout.num_layers):
                    pages.pages(layer, list(pages.block_ids))
        else:
            result = leader.step()
            if mode == "after" and result.schedule is not None:
                for sr in result.schedule.scheduled:
                    bs = leader.core.layout.block_size
                    end = sr.start_pos + sr.num_tokens
                    leader.gather_kv(sr.block_ids[sr.start_pos // bs : (end - 1) // bs + 1])
    return time.perf_counter() - t0


def run(layers: int, lengths: list[int], rounds: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        print(f"building the {layers}-layer model ...", flush=True)
        ckpt = build_tiny_checkpoint(d, family="llama", num_hidden_layers=layers, **WIDTH)
        config = build_engine_config(
            ckpt, mode="prefill_only", enable_prefix_caching=False, num_blocks=2 * max(lengths) // 16 + 8
        )
        cores = build_tp_cores(config, 2, "tp/kv-push-bench")
    follower = TPFollower(cores[1], "tp/kv-push-bench#1")
    leader = TPLeaderEngine(cores[0], [follower])
    gen = torch.Generator().manual_seed(3)
    rows = []
    try:
        prefill(leader, "during", torch.randint(3, 4000, (256,), generator=gen).tolist(), "warm-up")
        for n in lengths:
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(rounds):
                for m in MODES[r % 3 :] + MODES[: r % 3]:  # the order rotates
                    tokens = torch.randint(3, 4000, (n,), generator=gen).tolist()
                    times[m].append(prefill(leader, m, tokens, f"{n}-{r}-{m}"))
            row = {"tokens": n} | {f"{m}_ms": 1e3 * median(times[m]) for m in MODES}
            row["after_exposed_ms"] = row["after_ms"] - row["none_ms"]
            row["during_exposed_ms"] = row["during_ms"] - row["none_ms"]
            print(
                f"  {n} tokens: none {row['none_ms']:.1f} ms, after {row['after_ms']:.1f} ms, "
                f"during {row['during_ms']:.1f} ms",
                flush=True,
            )
            rows.append(row)
    finally:
        follower.stop(10.0)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| prompt tokens | prefill, no push | + gather after each step | + gather during each step "
        "| exposed: after | exposed: during |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['none_ms']:.1f} ms | {r['after_ms']:.1f} ms | {r['during_ms']:.1f} ms | "
            f"{r['after_exposed_ms']:.1f} ms | {r['during_exposed_ms']:.1f} ms |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = {"none": "no push", "after": "gather after the step", "during": "gather during the step"}
    grouped_bars(ax, [str(r["tokens"]) for r in rows], {v: [r[f"{m}_ms"] for r in rows] for m, v in labels.items()})
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill (ms, lower is better)")
    ax.set_title("TP=2 prefill with the layer-wise KV push's gathers (2-core CPU, gloo)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", default="1024,2048,3072")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": machine_description(), "load_before": os.getloadavg()[0]}
    res["rows"] = run(args.layers, [int(n) for n in args.lengths.split(",")], args.rounds)
    res["load_after"] = os.getloadavg()[0]
    save_results(res, args.out, "tp_kv_push", lambda path: plot(res["rows"], path), markdown(res["rows"]))


if __name__ == "__main__":
    main()
