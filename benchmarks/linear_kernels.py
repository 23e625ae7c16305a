"""The linears of one SmolLM2-135M decode step under each CPU kernel, by rows (tokens) per step.

    .venv/bin/python benchmarks/linear_kernels.py              # ~2 min; fp32 and bf16
    .venv/bin/python benchmarks/linear_kernels.py --out linear_kernels_avx2   # another machine's table
    # results: benchmarks/results/linear_kernels.json (--out NAME: NAME.json)

For M = 1..64 rows it times every linear of one forward of SmolLM2-135M's shapes (30 layers of
qkv [960, 576], o [576, 576], gate_up [3072, 576], down [576, 1536], plus the tied lm_head
[49152, 576]) with distinct random weights per layer, so the weights stream from memory as
in the model (538 MB fp32, far above the caches), under:

- ``native``: ``stream_linear`` (engine/native/csrc/linear.cpp), each weight row read once;
- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` (what ``engine.models.layers.linear``
  calls for large fp32 weights);
- ``packed``: the same op on weights reordered once into oneDNN's blocked layout
  (``pack_linear_weight``; KernelConfig.prepack_linear);
- ``mkl``: ``F.linear``.

Best of 5 per cell, the kernels interleaved per M; the 1-minute load average is recorded, and
the native build's vector paths (``simd_isa``). This table shows where each kernel's time goes;
KernelConfig.stream_linear_max_rows's per-ISA defaults (layers.STREAM_ROWS_BY_ISA) were then
set by the engine's whole decode step, where the pools' threads interact: AVX-512 4, AVX2 16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_description  # noqa: E402
from engine import native  # noqa: E402
from engine.models.layers import pack_linear_weight  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # per layer, [out, in]
LAYERS, HEAD = 30, (49152, 576)
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 64)


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def step_ms(fn, weights: list[torch.Tensor], m: int, dtype: torch.dtype) -> float:
    xs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in weights}}

    def once() -> None:
        for w in weights:
            fn(xs[w.shape[1]], w)

    once()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="linear_kernels", help="results file name in benchmarks/results (no .json)")
    args = ap.parse_args()
    module = native.load()
    if module is None:
        raise SystemExit("the native kernels did not build (see the warning above)")
    torch.manual_seed(0)
    results = {"machine": machine_description() | {"simd_isa": module.simd_isa()}, "rows": list(ROWS), "tables": {}}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(*s).to(dtype) for _ in range(LAYERS) for s in SHAPES] + [torch.randn(*HEAD).to(dtype)]
        mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
        kernels = {"native": (module.stream_linear, weights), "mkl": (F.linear, weights)}
        if dtype == torch.float32:
            kernels["onednn"] = (onednn, weights)
            kernels["packed"] = (onednn, [pack_linear_weight(w) for w in weights])
        table = []
        print(f"\n{dtype} ({mb:.0f} MB of weights per step)")
        print("| rows | " + " | ".join(f"{k} ms" for k in kernels) + " | load |")
        print("|---:|" + "---:|" * (len(kernels) + 1))
        for m in ROWS:
            row = {k: step_ms(fn, ws, m, dtype) for k, (fn, ws) in kernels.items()}
            row.update(rows=m, load=os.getloadavg()[0])
            table.append(row)
            print(f"| {m} | " + " | ".join(f"{row[k]:.1f}" for k in kernels) + f" | {row['load']:.1f} |", flush=True)
        results["tables"][str(dtype).removeprefix("torch.")] = {"weights_mb": mb, "rows": table}
        del weights, kernels
    out = RESULTS_DIR / f"{args.out}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
