"""`make run` before a cluster exists: build a tiny random-weight Llama and generate offline.

Usage: python -m engine.demo [--model DIR] [--max-tokens N]
With no --model it builds (once, cached under ~/.cache/splitserve) a small random-weight
Llama checkpoint with a real tokenizer, so the output is real generated text of a model
nobody trained: fluent it is not.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from engine import LLM, SamplingParams

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "splitserve", "tiny-llama")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face safetensors directory (default: build a tiny Llama)")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = args.model
    if model is None:
        from engine.models.tiny import build_tiny_checkpoint

        print(f"building a tiny random-weight Llama in {DEFAULT_DIR} ...", flush=True)
        model = build_tiny_checkpoint(DEFAULT_DIR, family="llama")
    llm = LLM(model=model, dtype="float32", device="cpu")
    prompts = ["The quick brown fox", "Disaggregated serving splits prefill and decode because", "Once upon a time"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs, strict=True):
        print(f"\nprompt: {p!r}\n  -> {o.text!r}\n  token ids: {o.token_ids[:12]}... ({o.finish_reason})")
    n = sum(len(o.token_ids) for o in outs)
    print(f"\n{n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s) on {llm.engine.config.device}")


if __name__ == "__main__":
    main()
