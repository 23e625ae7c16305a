"""Attention offload capacity (issue 13): the model worker serves more concurrent sequences
than its own KV budget could hold, because the attention pool holds the KV.

One machine cannot show real memory-rich attention nodes, so capacity is shown with
configured block budgets (``num_blocks``), as the issue asks: the model worker's own budget
is ``--own-blocks`` blocks of KV (what a plain, non-offloaded engine on it would hold); the
offloaded model worker allocates no KV pages of its own (a one-block placeholder) and its
batch is bounded by the attention pool's blocks. The shards run in this process over the
loopback transport (tokens and admission are what is measured, not speed).

Workload: ``--requests`` requests of ``--prompt`` random prompt tokens and ``--new`` new
tokens each, all submitted at once, greedy; SmolLM2-135M-Instruct (fp32) unless ``--model``.
For each configuration: the peak number of running sequences, the peak KV tokens held, the
preemptions, the steps to finish, and whether the outputs equal the plain engine's (a
correctness guard, not the point). Configurations:

  plain            EngineCore with the model worker's own budget (--own-blocks)
  offload AxB      A attention workers of B blocks each (the model worker's own KV: none)

Run:  .venv/bin/python benchmarks/attention_capacity.py        # ~2 min
Results: benchmarks/results/attention_capacity.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _requests(n: int, prompt: int, new: int, seed: int) -> list[Any]:
    from engine.request import Request, SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    return [Request(f"r{i}", [rng.randrange(3, 40000) for _ in range(prompt)], params) for i in range(n)]


def _drive(engine: Any, reqs: list[Any], block_size: int, used_blocks: Any) -> dict[str, Any]:
    """Submit every request, step until done; peaks are read after each step. ``engine``: an
    EngineCore or an OffloadedEngine (its stats are its core's)."""
    core = getattr(engine, "core", engine)
    for r in reqs:
        engine.add_request(r)
    peak_running = peak_blocks = steps = 0
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
        steps += 1
        peak_running = max(peak_running, core.stats().running_requests)
        peak_blocks = max(peak_blocks, used_blocks())
    wall = time.perf_counter() - t0
    st = core.stats()
    return {
        "peak_running": peak_running,
        "peak_kv_tokens": peak_blocks * block_size,
        "preemptions": st.preemptions,
        "steps": steps,
        "wall_s": wall,
        "outputs": [list(r.output_token_ids) for r in reqs],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from attention_offload.build import build_loopback
    from engine.engine import EngineCore
    from engine.llm import build_engine_config
    from engine.models.gguf import resolve_model_path

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = resolve_model_path(args.model)
    bs = args.block_size
    rows: list[dict[str, Any]] = []

    def config(blocks: int):
        return build_engine_config(model, enable_prefix_caching=False, num_blocks=blocks, block_size=bs)

    print(f"plain engine, {args.own_blocks} blocks of {bs} tokens ...", flush=True)
    plain = EngineCore(config(args.own_blocks))
    res = _drive(
        plain,
        _requests(args.requests, args.prompt, args.new, args.seed),
        bs,
        lambda: plain.stats().total_kv_blocks - plain.stats().free_kv_blocks,
    )
    reference = res["outputs"]
    rows.append({"config": "plain", "workers": 0, "blocks_per_worker": 0, "own_kv_tokens": args.own_blocks * bs, **res})
    for spec in args.pools.split(","):
        a, b = (int(x) for x in spec.split("x"))
        print(f"offload: {a} attention worker(s) x {b} blocks ...", flush=True)
        eng = build_loopback(config(a * b), [b] * a, rotation=args.rotation, threaded=False)
        res = _drive(
            eng, _requests(args.requests, args.prompt, args.new, args.seed), bs, lambda e=eng: sum(e.used_blocks())
        )
        rows.append({"config": f"offload {a}x{b}", "workers": a, "blocks_per_worker": b, "own_kv_tokens": 0, **res})
    for r in rows:
        r["attention_kv_tokens"] = r["workers"] * r["blocks_per_worker"] * bs
        r["equal_to_plain"] = sum(o == p for o, p in zip(r.pop("outputs"), reference, strict=True))
        r["requests"] = args.requests
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| configuration | model worker's own KV (tokens) | attention pool KV (tokens) | peak running sequences "
        "| peak KV held (tokens) | preemptions | steps | outputs equal to plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['config']} | {r['own_kv_tokens']} | {r['attention_kv_tokens']} | {r['peak_running']} "
            f"| {r['peak_kv_tokens']} | {r['preemptions']} | {r['steps']} | {r['equal_to_plain']}/{r['requests']} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = [r for r in rows if r["workers"] > 0]
    (plain,) = (r for r in rows if r["workers"] == 0)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([r["attention_kv_tokens"] for r in off], [r["peak_running"] for r in off], "o-", label="offloaded")
    for r in off:
        ax.annotate(
            r["config"].split()[1],
            (r["attention_kv_tokens"], r["peak_running"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=8,
        )
    ax.axhline(plain["peak_running"], color="grey", ls="--", label=f"plain, own budget {plain['own_kv_tokens']} tokens")
    ax.set_xlabel("attention pool KV (tokens, configured block budgets)")
    ax.set_ylabel("peak concurrent sequences")
    ax.set_title("Model worker batch vs attention-pool memory (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--own-blocks", type=int, default=64, help="the model worker's own KV budget, in blocks")
    ap.add_argument("--pools", default="1x64,2x64,2x128,4x128", help="attention pools: WORKERSxBLOCKS, comma-separated")
    ap.add_argument("--rotation", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="attention_capacity")
    args = ap.parse_args()
    if args.model is None:
        from tests.real_model import real_model_dir

        args.model = real_model_dir()  # SmolLM2-135M-Instruct, fetched once
    load0 = os.getloadavg()
    rows = run(args)
    RESULTS_DIR.mkdir(exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    data = {"args": meta, "load_start": load0, "load_end": os.getloadavg(), "rows": rows}
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(data, indent=2))
    plot(rows, RESULTS_DIR / f"{args.out}.png")
    print(table(rows))


if __name__ == "__main__":
    main()
