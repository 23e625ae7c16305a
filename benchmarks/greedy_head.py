"""The greedy head (engine/models/greedy_head.py) against the full float32 head, on SmolLM2.

    .venv/bin/python benchmarks/greedy_head.py          # ~1.5 min
    # results: benchmarks/results/greedy_head.json and .png

Part 1, the head alone. Real final hidden rows: 64 prompts of 128 random tokens decoded for 24
tokens by engine.LLM, every row its sampler saw kept. For 1, 8 and 64 rows at a time:

- ``full``: what a plain-greedy step ran before: the float32 head (the streaming kernel up to 4
  rows, oneDNN on the packed weight above) and the native argmax;
- ``screened``: ``GreedyHead.tokens`` (bf16 screen, bound, float32 refinement);

median over every batch of rows, the two interleaved batch by batch; candidates per row; and
whether the two give the same token for every row.

Part 2, the engine's decode step (SmolLM2 fp32, batch 1 / 8 / 64 at context ~170): the median
step with the greedy head and without it (``runner.greedy_head`` set to None), interleaved step
by step.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    interleaved_decode_steps,
    machine_description,
    median,
    random_prompts,
    save_results,
)
from engine import LLM, SamplingParams  # noqa: E402

ROWS = [1, 8, 64]


def load() -> LLM:
    from cluster.model_store import fetch_model
    from engine.models.gguf import resolve_model_path

    print("loading SmolLM2-135M (fp32) ...", flush=True)
    path = resolve_model_path(fetch_model(progress=True))
    return LLM(path, dtype="float32", max_num_seqs=64, enable_prefix_caching=False, skip_tokenizer_init=True)


def hidden_rows(llm: LLM) -> torch.Tensor:
    """Every final hidden row the sampler saw while 64 random prompts decode 24 tokens: [R, H]."""
    runner = llm.engine.runner
    seen: list[torch.Tensor] = []
    head = runner.greedy_head
    real = head.tokens
    head.tokens = lambda x: (seen.append(x.clone()), real(x))[1]  # type: ignore[method-assign]
    prompts = random_prompts(64, seed=5)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    finally:
        del head.tokens
    return torch.cat(seen)


def head_alone(llm: LLM, rows: torch.Tensor) -> list[dict[str, Any]]:
    model, head = llm.engine.model, llm.engine.runner.greedy_head

    def full(x: torch.Tensor) -> list[int]:
        return model.native.argmax(model.compute_logits(x)).tolist()

    out = []
    for n in ROWS:
        times: dict[str, list[float]] = {"full": [], "screened": []}
        same = total = 0
        head.rows = head.candidates = 0
        for i in range(0, rows.shape[0] - n + 1, n):
            x = rows[i : i + n].contiguous()
            got = {}
            for name, fn in (("full", full), ("screened", head.tokens)):
                t0 = time.perf_counter()
                got[name] = fn(x)
                times[name].append(time.perf_counter() - t0)
            same += sum(a == b for a, b in zip(got["full"], got["screened"], strict=True))
            total += n
        row = {
            "rows": n,
            "calls": len(times["full"]),
            "full_ms": 1e3 * median(times["full"]),
            "screened_ms": 1e3 * median(times["screened"]),
            "candidates_per_row": head.candidates / max(head.rows, 1),
            "same_tokens": same,
            "tokens": total,
        }
        print(
            f"  {n} rows: full {row['full_ms']:.2f} ms, screened {row['screened_ms']:.2f} ms, "
            f"{row['candidates_per_row']:.1f} candidates/row, same {same}/{total}",
            flush=True,
        )
        out.append(row)
    return out


def engine_steps(llm: LLM, steps: int) -> list[dict[str, Any]]:
    runner = llm.engine.runner
    head = runner.greedy_head
    variants = {"screened": functools.partial(setattr, runner, "greedy_head", head)}
    variants["full"] = functools.partial(setattr, runner, "greedy_head", None)
    out = []
    for batch in ROWS:
        row = {"batch": batch} | interleaved_decode_steps(llm, batch, steps, variants)
        print(f"  batch {batch}: step {row['screened_step_ms']:.1f} ms (full head: {row['full_step_ms']:.1f} ms)")
        out.append(row)
    runner.greedy_head = head
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| rows | full fp32 head + argmax | greedy head | ratio | candidates / row | same token |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["head"]:
        lines.append(
            f"| {r['rows']} | {r['full_ms']:.2f} ms | {r['screened_ms']:.2f} ms | "
            f"{r['screened_ms'] / r['full_ms']:.2f}x | {r['candidates_per_row']:.1f} | {r['same_tokens']}/{r['tokens']} |"
        )
    lines += ["", "| batch | context | decode step, greedy head | full head | ratio |", "|---:|---:|---:|---:|---:|"]
    for r in res["engine"]:
        lines.append(
            f"| {r['batch']} | ~{r['context']} | {r['screened_step_ms']:.1f} ms | {r['full_step_ms']:.1f} ms | "
            f"{r['screened_step_ms'] / r['full_step_ms']:.2f}x |"
        )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, rows, key, a, b, title in (
        (axes[0], res["head"], "rows", "full_ms", "screened_ms", "head + argmax (ms)"),
        (axes[1], res["engine"], "batch", "full_step_ms", "screened_step_ms", "decode step (ms)"),
    ):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r[a] for r in rows], 0.4, label="full fp32 head")
        ax.bar([i + 0.2 for i in x], [r[b] for r in rows], 0.4, label="greedy head (bf16 screen + fp32 refine)")
        ax.set_xticks(list(x), [str(r[key]) for r in rows])
        ax.set_xlabel(key)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M fp32, greedy decoding (2-core CPU; lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15, help="engine decode steps per variant")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    res: dict[str, Any] = {"machine": machine_description(), "load_before": os.getloadavg()[0]}
    llm = load()
    if llm.engine.runner.greedy_head is None:
        raise SystemExit("the greedy head is not available here (native kernels, oneDNN bf16)")
    print("hidden rows ...", flush=True)
    rows = hidden_rows(llm)
    print(f"head alone ({rows.shape[0]} rows):", flush=True)
    res["head"] = head_alone(llm, rows)
    print("engine decode steps:", flush=True)
    res["engine"] = engine_steps(llm, args.steps)
    res["load_after"] = os.getloadavg()[0]
    save_results(res, args.out, "greedy_head", lambda path: plot(res, path), markdown(res))


if __name__ == "__main__":
    main()
