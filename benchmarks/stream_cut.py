"""Where streaming stops paying in the engine's decode step: KernelConfig.stream_linear_max_rows.

    .venv/bin/python benchmarks/stream_cut.py                          # ~2 min: batches 8,12,16, cuts 4,16
    .venv/bin/python benchmarks/stream_cut.py --batches 8 --cuts 4,8,16

SmolLM2-135M (fp32), one engine; for each batch (rows per decode step) every cut runs one
decode step per round, interleaved (benchmarks/common.interleaved_decode_steps: context ~170,
median of --steps rounds). A cut at or above the batch streams every linear of the step; below
it the step runs oneDNN on the packed weights. layers.STREAM_ROWS_BY_ISA holds the cut chosen
per ISA from these numbers (the kernel's simd_isa() is printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved_decode_steps  # noqa: E402
from engine import LLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8,12,16")
    ap.add_argument("--cuts", default="4,16")
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    from cluster.model_store import fetch_model
    from engine.models.gguf import resolve_model_path

    llm = LLM(resolve_model_path(fetch_model(progress=True)), max_num_seqs=64, skip_tokenizer_init=True)
    kernels = llm.engine.model.native
    if kernels is None:
        raise SystemExit("the native kernels did not build")
    print(f"simd_isa: {kernels.module.simd_isa()}; default cut {kernels.max_rows}")
    cuts = [int(c) for c in args.cuts.split(",")]
    # NativeKernels is frozen; the cut is set per variant for this measurement only
    variants = {f"cut {c}": (lambda c=c: object.__setattr__(kernels, "max_rows", c)) for c in cuts}
    print("| batch | " + " | ".join(f"cut {c} ms" for c in cuts) + " |")
    print("|---:|" + "---:|" * len(cuts))
    for batch in (int(b) for b in args.batches.split(",")):
        got = interleaved_decode_steps(llm, batch, args.steps, variants)
        print(f"| {batch} | " + " | ".join(f"{got[f'cut {c}_step_ms']:.1f}" for c in cuts) + " |", flush=True)


if __name__ == "__main__":
    main()
