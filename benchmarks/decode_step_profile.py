"""Where one decode step's time goes: per-kernel milliseconds of SmolLM2-135M's decode step.

    .venv/bin/python benchmarks/decode_step_profile.py --batch 64     # ~30 s
    # prints the table; nothing is written

SmolLM2-135M (``--dtype``, fp32 by default; default kernels) decodes ``--batch`` sequences of 128 random prompt tokens;
after the prefill and 30 decode steps (context ~160) it times ``--steps`` steps, with every
call into the native module (engine/native) and every oneDNN / MKL linear
(``engine.models.layers.linear``) wrapped by a wall-clock timer. "rest" is the step minus
the timed calls: Python, the scheduler, the sampler's torch ops. The wrappers cost a few
microseconds per call (~200 calls per step), so the step itself reads slightly slower than
unwrapped.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import random_prompts  # noqa: E402
from engine import native  # noqa: E402
from engine.models import layers  # noqa: E402

SECONDS: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def _timed(name: str, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - t0
            CALLS[name] += 1

    return call


class _TimedModule:
    """The native module with every function timed under its own name."""

    def __init__(self, mod: ModuleType):
        self._mod = mod

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._mod, name)
        return _timed(name, attr) if callable(attr) else attr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    mod = native.load()
    if mod is None:
        raise SystemExit("the native kernels did not build")
    timed = _TimedModule(mod)
    native.load = lambda *a, **k: timed  # every later load (the model's kernels, the attention backend)
    layers.linear = _timed("onednn/mkl linear", layers.linear)

    from cluster.model_store import fetch_model
    from engine import LLM, SamplingParams
    from engine.models.gguf import resolve_model_path
    from engine.request import Request

    llm = LLM(
        resolve_model_path(fetch_model(progress=True)),
        dtype=args.dtype,
        max_num_seqs=64,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
    )
    eng = llm.engine
    reqs = [
        Request(f"r{i}", p, SamplingParams(max_tokens=40 + args.steps, temperature=0, ignore_eos=True))
        for i, p in enumerate(random_prompts(args.batch, seed=11))
    ]
    for r in reqs:
        eng.add_request(r)
    while any(len(r.output_token_ids) < 30 for r in reqs):
        eng.step()
    SECONDS.clear()
    CALLS.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    step = (time.perf_counter() - t0) / args.steps
    print(f"\nbatch {args.batch}, context ~{128 + 30 + args.steps // 2}: decode step {1e3 * step:.1f} ms\n")
    print("| call | ms / step | calls / step |\n|---|---:|---:|")
    for name, secs in SECONDS.most_common():
        print(f"| {name} | {1e3 * secs / args.steps:.2f} | {CALLS[name] // args.steps} |")
    print(f"| rest | {1e3 * (step - sum(SECONDS.values()) / args.steps):.2f} | |")


if __name__ == "__main__":
    main()
