"""Decode attention on CPU: the native paged kernel alone, and inside the engine's decode step.

    .venv/bin/python benchmarks/paged_decode.py            # ~1 min (engine part: model load + 2 x 30 steps)
    # results: benchmarks/results/paged_decode.json and .png

Part 1, the kernel alone. One decode-attention call per layer over 30 layers of distinct
caches, so K/V stream from memory as in the model (working sets of 50-560 MB, far above the
caches), pages shuffled as a long-running pool leaves them. Each case times:

- ``native``: ``paged_decode`` (engine/native/csrc/paged_decode.cpp), pages read in place;
- ``sdpa``: the torch fallback of TorchSDPABackend (``gather_pages`` + masked SDPA);

median of 5 rounds of 30 layers, the two interleaved per round, with the K/V bytes per call
and the GB/s they imply against ``buf.sum()``'s read bandwidth measured in the same run.

Part 2, inside the engine. SmolLM2-135M (fp32) decoding a batch of 8 or 64 sequences of 128
prompt tokens, at context ~170: the median decode step with the default kernels, and with
the kernels' parallel chunks kept on their own thread pool after oneDNN linears (the
behaviour before ChunkPool.set_openmp; a benchmark-only wrapper makes ``set_openmp`` a no-op).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from benchmarks.common import RESULTS_DIR, machine_description, median, memory_bandwidth_gbps  # noqa: E402
from engine import native  # noqa: E402
from engine.attention.sdpa import gather_pages  # noqa: E402

LAYERS = 30
# (batch, context, query heads, kv heads, head dim): SmolLM2 (9/3 x 64) at the engine
# benchmark's batches and contexts, a long single sequence, and a Llama-8B-like head shape
CASES = [(8, 190, 9, 3, 64), (64, 170, 9, 3, 64), (1, 2048, 9, 3, 64), (16, 1024, 9, 3, 64), (8, 512, 32, 8, 128)]


def kernel_case(mod: ModuleType, b: int, ctx: int, h: int, hkv: int, d: int, rounds: int) -> dict[str, Any]:
    bs = 16
    nblk = -(-ctx // bs)
    num_blocks = b * nblk + 8
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, num_blocks, bs, hkv, d, generator=gen) for _ in range(LAYERS)]
    table = torch.randperm(num_blocks, generator=gen)[: b * nblk].view(b, nblk).long()
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
    res = {"batch": b, "context": ctx, "heads": h, "kv_heads": hkv, "head_dim": d, "kv_bytes_per_call": nbytes}
    for name, ts in times.items():
        res[f"{name}_ms"] = 1e3 * median(ts)
        res[f"{name}_gbps"] = nbytes / median(ts) / 1e9
    print(
        f"  B={b:3d} ctx={ctx:5d} {h}/{hkv}x{d}: native {res['native_ms']:.3f} ms ({res['native_gbps']:.1f} GB/s), "
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


def engine_steps(batches: list[int], steps: int) -> list[dict[str, Any]]:
    from cluster.model_store import fetch_model
    from engine import LLM, SamplingParams
    from engine.models.gguf import resolve_model_path
    from engine.request import Request

    print("loading SmolLM2-135M ...", flush=True)
    llm = LLM(
        resolve_model_path(fetch_model(progress=True)),
        dtype="float32",
        max_num_seqs=64,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
    )
    eng, model = llm.engine, llm.engine.model
    kernels = model.native
    assert kernels is not None, "the native kernels did not build"
    variants = {"default": kernels, "own-pool": dataclasses.replace(kernels, module=_NoPoolSwitch(kernels.module))}
    gen = torch.Generator().manual_seed(11)
    out = []
    for batch in batches:
        times: dict[str, list[float]] = {k: [] for k in variants}
        reqs = [
            Request(
                f"b{batch}-{i}",
                torch.randint(3, 49152, (128,), generator=gen).tolist(),
                SamplingParams(max_tokens=30 + 2 * steps, temperature=0, ignore_eos=True),
            )
            for i in range(batch)
        ]
        for r in reqs:
            eng.add_request(r)
        while any(len(r.output_token_ids) < 30 for r in reqs):  # prefill, then reach context ~160
            eng.step()
        for _ in range(steps):  # the variants interleaved step by step
            for name, kn in variants.items():
                model.set_native_kernels(kn)
                t0 = time.perf_counter()
                eng.step()
                times[name].append(time.perf_counter() - t0)
        model.set_native_kernels(kernels)
        while eng.has_work():
            eng.step()
        row = {"batch": batch, "context": 128 + 30 + steps} | {
            f"{k}_step_ms": 1e3 * median(v) for k, v in times.items()
        }
        print(
            f"  batch {batch}: step {row['default_step_ms']:.1f} ms (own pool: {row['own-pool_step_ms']:.1f} ms)",
            flush=True,
        )
        out.append(row)
    return out


def markdown(res: dict[str, Any]) -> str:
    bw = res["read_gbps"]
    lines = [
        f"read bandwidth (`buf.sum()`, same run): {bw:.1f} GB/s",
        "",
        "| batch | context | heads (q/kv x dim) | K/V per call | native | sdpa fallback | native / sdpa | native GB/s (of read bw) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["kernel"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['heads']}/{r['kv_heads']} x {r['head_dim']} | "
            f"{r['kv_bytes_per_call'] / 1e6:.1f} MB | {r['native_ms']:.3f} ms | {r['sdpa_ms']:.3f} ms | "
            f"{r['native_ms'] / r['sdpa_ms']:.2f}x | {r['native_gbps']:.1f} ({r['native_gbps'] / bw:.0%}) |"
        )
    if res["engine"]:
        lines += [
            "",
            "| batch | context | decode step | kernels kept on their own pool | ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in res["engine"]:
            lines.append(
                f"| {r['batch']} | ~{r['context']} | {r['default_step_ms']:.1f} ms | {r['own-pool_step_ms']:.1f} ms | "
                f"{r['default_step_ms'] / r['own-pool_step_ms']:.2f}x |"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["kernel"]
    labels = [f"B={r['batch']}\nctx {r['context']}\n{r['heads']}/{r['kv_heads']}x{r['head_dim']}" for r in rows]
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
    res["engine"] = engine_steps([8, 64], args.steps) if args.engine else []
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
