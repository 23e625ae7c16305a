"""Benchmark (not a test): engine.LLM greedy decoding with and without speculation.

    .venv/bin/python benchmarks/speculation.py --model DIR_OR_GGUF [--method ngram|draft_model]
        [--draft DIR] [--k 4] [--policy fixed|smartspec] [--max-tokens 128] [--batch 1]
        [--repeats 3] [--threads 1] [--json OUT]

Prompts: quote / rewrite / summarise requests over a short public-domain text (the US
Declaration of Independence, first paragraphs), rendered in ChatML (SmolLM2's template):
the answers repeat spans of the prompt, so prompt lookup has something to find. Each run
generates every prompt (``--batch`` at a time) to ``--max-tokens`` with ignore_eos, plain and
speculative, in the same process with the same thread count, alternating, ``--repeats``
times; it reports decode tokens/s (output tokens over wall time, prompt steps included),
the median ratio, acceptance, mean accepted length and the fraction of tokens identical to
the plain output. Record ``uptime`` beside the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm import LLM  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political "
    "bands which have connected them with another, and to assume among the powers of the earth, the separate "
    "and equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the "
    "opinions of mankind requires that they should declare the causes which impel them to the separation. "
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness."
)
TASKS = (
    "Repeat the following text exactly, word for word:\n\n",
    "Quote the first two sentences of this text:\n\n",
    "Rewrite the following text, keeping its wording where you can:\n\n",
    "Summarise the following text, quoting its key phrases:\n\n",
)


def chatml(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="ngram", choices=["ngram", "draft_model"])
    ap.add_argument("--draft", default=None, help="draft checkpoint for --method draft_model")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--policy", default="fixed", choices=["fixed", "smartspec"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = {"method": args.method, "num_speculative_tokens": args.k, "policy": args.policy}
    if args.method == "draft_model":
        spec["model"] = args.draft
    prompts = [chatml(t + TEXT) for t in TASKS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    plain = LLM(args.model, num_blocks=1024, enable_prefix_caching=False)
    specd = LLM(args.model, num_blocks=1024, enable_prefix_caching=False, speculative_config=spec)

    def run(llm: LLM) -> tuple[float, list[list[int]]]:
        outs, start = [], time.perf_counter()
        for i in range(0, len(prompts), args.batch):
            outs += [o.token_ids for o in llm.generate(prompts[i : i + args.batch], params)]
        return time.perf_counter() - start, outs

    run(plain), run(specd)  # warm up (native kernels, allocator)
    before = specd.engine.spec_stats()
    rows = []
    for _ in range(args.repeats):
        tp, ref = run(plain)
        ts, got = run(specd)
        n = sum(map(len, ref))
        same = sum(
            next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g)))
            for r, g in zip(ref, got, strict=True)
        )
        rows.append({"plain_tok_s": n / tp, "spec_tok_s": n / ts, "speedup": tp / ts, "identical": same / n})
    st = specd.engine.spec_stats()
    proposed = st.proposed_tokens - before.proposed_tokens
    accepted = st.accepted_tokens - before.accepted_tokens
    verified = st.verified_requests - before.verified_requests
    emitted = st.emitted_tokens - before.emitted_tokens
    result = {
        "model": os.path.basename(args.model.rstrip("/")),
        "spec": spec,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "runs": rows,
        "median_speedup": statistics.median(r["speedup"] for r in rows),
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted_length": emitted / verified if verified else 0.0,
        "k_counts": st.k_counts,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
