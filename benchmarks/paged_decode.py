"""Decode attention on CPU: the native paged kernel alone, and inside the engine's decode step.

    .venv/bin/python benchmarks/paged_decode.py            # ~1.5 min (engine part: 2 model loads, 4 x 30 steps)
    # results: benchmarks/results/paged_decode.json and .png

Part 1, the kernel alone. One decode-attention call per layer over 30 layers of distinct
caches, so K/V stream from memory as in the model (working sets of 50-560 MB, far above the
caches), pages shuffled as a long-running pool leaves them (one case also in order, as a
fresh engine allocates them). Each case times:

- ``native``: ``paged_decode`` (engine/native/csrc/paged_decode.cpp), pages read in place;
- ``sdpa``: the torch fallback of TorchSDPABackend (``gather_pages`` + masked SDPA);

median of 5 rounds of 30 layers, the two interleaved per round, with the K/V bytes per call
and the GB/s they imply against ``buf.sum()``'s read bandwidth measured in the same run.

Part 2, inside the engine. SmolLM2-135M (fp32) decoding a batch of 8 or 64 sequences of 128
prompt tokens, at context ~170: the median decode step with the default threads, and with
the native kernels' parallel chunks kept on their own thread pool (ChunkPool; the behaviour
before ChunkPool.set_openmp), the two interleaved step by step. Twice: with the native
linears (a benchmark-only wrapper makes NativeKernels' ``set_openmp`` a no-op), and with
torch's linears (``native_kernels=False``, the path of MoE models and TP shards, where the
pool is set by hand).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    interleaved_decode_steps,
    machine_description,
    median,
    memory_bandwidth_gbps,
)
from engine import native  # noqa: E402
from engine.attention.sdpa import gather_pages  # noqa: E402

LAYERS = 30
# (batch, context, query heads, kv heads, head dim, pages shuffled): SmolLM2 (9/3 x 64) at the
# engine benchmark's batches and contexts (batch 64 also with pages in order, as a fresh
# engine allocates them), a long single sequence, and a Llama-8B-like head shape
CASES = [
    (8, 190, 9, 3, 64, True),
    (64, 170, 9, 3, 64, True),
    (64, 170, 9, 3, 64, False),
    (1, 2048, 9, 3, 64, True),
    (16, 1024, 9, 3, 64, True),
    (8, 512, 32, 8, 128, True),
]


def kernel_case(
    mod: ModuleType, b: int, ctx: int, h: int, hkv: int, d: int, shuffled: bool, rounds: int
) -> dict[str, Any]:
    bs = 16
    nblk = -(-ctx // bs)
    num_blocks = b * nblk + 8
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, num_blocks, bs, hkv, d, generator=gen) for _ in range(LAYERS)]
    order = torch.randperm(num_blocks, generator=gen) if shuffled else torch.arange(num_blocks)
    table = order[: b * nblk].view(b, nblk).long()
    lens = torch.full((b,), ctx, dtype=torch.long)
    q = torch.randn(b, h, d, generator=gen)
    keys = torch.arange(nblk * bs)
    mask = (keys[None, None, None, :] < lens[:, None, None, None]).expand(b, 1, 1, nblk * bs)
    scale = 1.0 / math.sqrt(d)

    def native_layers() -> None:
        for kv in caches:
            mod.paged_decode(q, kv[0], kv[1], table, lens, scale, -1)

    def sdpa_layers() -> None:
        for kv in caches:
            kk, vv = gather_pages(kv[0], table), gather_pages(kv[1], table)
            torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask, enable_gqa=True)

    out_native = mod.paged_decode(q, caches[0][0], caches[0][1], table, lens, scale, -1)
    kk, vv = gather_pages(caches[0][0], table), gather_pages(caches[0][1], table)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out_native, ref[:, :, 0], atol=1e-5, rtol=1e-5)  # same work, same answer
    times: dict[str, list[float]] = {"native": [], "sdpa": []}
    for _ in range(rounds):
        for name, fn in (("native", native_layers), ("sdpa", sdpa_layers)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / LAYERS)
    nbytes = 2 * b * ctx * hkv * d * 4
    res = {"batch": b, "context": ctx, "heads": h, "kv_heads": hkv, "head_dim": d, "shuffled": shuffled}
    res["kv_bytes_per_call"] = nbytes
    for name, ts in times.items():
        res[f"{name}_ms"] = 1e3 * median(ts)
        res[f"{name}_gbps"] = nbytes / median(ts) / 1e9
    print(
        f"  B={b:3d} ctx={ctx:5d} {h}/{hkv}x{d} {'shuffled' if shuffled else 'in order'}: native {res['native_ms']:.3f} ms ({res['native_gbps']:.1f} GB/s), "
        f"sdpa {res['sdpa_ms']:.3f} ms ({res['sdpa_gbps']:.1f} GB/s)",
        flush=True,
    )
    return res


class _NoPoolSwitch:
    """The native module with ``set_openmp`` a no-op: kernels stay on ChunkPool's threads."""

    def __init__(self, mod: ModuleType):
        self._mod = mod

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mod, name)

    def set_openmp(self, on: bool) -> None:
        self._mod.set_openmp(False)


def engine_steps(batches: list[int], steps: int, mod: ModuleType) -> list[dict[str, Any]]:
    """Decode-step medians of SmolLM2, per model kind and batch, default threads vs own pool."""
    from cluster.model_store import fetch_model
    from engine.models.gguf import resolve_model_path

    path = resolve_model_path(fetch_model(progress=True))
    return [row for native_linears in (True, False) for row in _model_steps(path, native_linears, batches, steps, mod)]


def _model_steps(path: str, native_linears: bool, batches: list[int], steps: int, mod: ModuleType) -> list[dict]:
    from engine import LLM

    kind = "native linears" if native_linears else "torch linears"
    print(f"loading SmolLM2-135M ({kind}) ...", flush=True)
    llm = LLM(
        path,
        dtype="float32",
        max_num_seqs=64,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        native_kernels=native_linears,
    )
    model = llm.engine.model
    if native_linears:  # NativeKernels.linear picks the threads; the wrapper pins its own pool
        kernels = model.native
        assert kernels is not None, "the native kernels did not build"
        own = dataclasses.replace(kernels, module=_NoPoolSwitch(kernels.module))
        variants = {
            "default": functools.partial(model.set_native_kernels, kernels),
            "own-pool": functools.partial(model.set_native_kernels, own),
        }
    else:  # nothing sets the threads: the default (OpenMP) against the kernels' own pool
        assert model.native is None
        variants = {
            "default": functools.partial(mod.set_openmp, True),
            "own-pool": functools.partial(mod.set_openmp, False),
        }
    rows = []
    for batch in batches:
        row = {"model": kind, "batch": batch} | interleaved_decode_steps(llm, batch, steps, variants)
        print(
            f"  {kind}, batch {batch}: step {row['default_step_ms']:.1f} ms (own pool: {row['own-pool_step_ms']:.1f} ms)",
            flush=True,
        )
        rows.append(row)
    variants["default"]()  # leave the default threads behind
    return rows


def markdown(res: dict[str, Any]) -> str:
    bw = res["read_gbps"]
    lines = [
        f"read bandwidth (`buf.sum()`, same run): {bw:.1f} GB/s",
        "",
        "| batch | context | heads (q/kv x dim) | pages | K/V per call | native | sdpa fallback | native / sdpa "
        "| native GB/s (of read bw) |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["kernel"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['heads']}/{r['kv_heads']} x {r['head_dim']} | "
            f"{'shuffled' if r['shuffled'] else 'in order'} | {r['kv_bytes_per_call'] / 1e6:.1f} MB | {r['native_ms']:.3f} ms | {r['sdpa_ms']:.3f} ms | "
            f"{r['native_ms'] / r['sdpa_ms']:.2f}x | {r['native_gbps']:.1f} ({r['native_gbps'] / bw:.0%}) |"
        )
    if res["engine"]:
        lines += [
            "",
            "| model | batch | context | decode step | kernels kept on their own pool | ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in res["engine"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | ~{r['context']} | {r['default_step_ms']:.1f} ms | "
                f"{r['own-pool_step_ms']:.1f} ms | "
                f"{r['default_step_ms'] / r['own-pool_step_ms']:.2f}x |"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["kernel"]
    labels = [
        f"B={r['batch']}\nctx {r['context']}\n{r['heads']}/{r['kv_heads']}x{r['head_dim']}"
        + ("" if r["shuffled"] else "\nin order")
        for r in rows
    ]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["native_gbps"] for r in rows], 0.4, label="native paged_decode")
    ax.bar([i + 0.2 for i in x], [r["sdpa_gbps"] for r in rows], 0.4, label="gather + SDPA (fallback)")
    ax.axhline(res["read_gbps"], color="k", ls="--", lw=1, label="read bandwidth (buf.sum)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("K/V GB/s (higher is better)")
    ax.set_title("Decode attention per layer, K/V from memory (2-core CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15, help="engine decode steps per variant")
    ap.add_argument("--no-engine", dest="engine", action="store_false", help="the kernel alone")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    mod = native.load()
    if mod is None:
        raise SystemExit("the native kernels did not build")
    res: dict[str, Any] = {"machine": machine_description(), "load_before": os.getloadavg()[0]}
    print("read bandwidth ...", flush=True)
    res["read_gbps"] = memory_bandwidth_gbps()["read"]
    print("kernel alone (30 layers per call round):", flush=True)
    mod.set_openmp(False)  # the kernel's own pool (ChunkPool), as the published table ran
    res["kernel"] = [kernel_case(mod, *case, rounds=args.rounds) for case in CASES]
    res["engine"] = engine_steps([8, 64], args.steps, mod) if args.engine else []
    res["load_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paged_decode.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "paged_decode.png")
    print()
    print(markdown(res))
    print(f"\nwrote {out / 'paged_decode.json'} and .png (load {res['load_before']:.1f} -> {res['load_after']:.1f})")


if __name__ == "__main__":
    main()
