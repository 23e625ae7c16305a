"""Helpers shared by benchmark scripts: machine description, memory bandwidth, timing.

Everything here is plain torch/stdlib so a benchmark can import it before heavy libraries.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)  # kB -> GiB
    except OSError:
        pass
    return None


def machine_description() -> dict[str, object]:
    """What the numbers were measured on (goes into every results JSON)."""
    import transformers

    mem = _mem_total_gib()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 / AVX512: the kernels' vector paths
        "torch_threads": torch.get_num_threads(),
        "memory_gib": None if mem is None else round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Fastest of ``reps`` wall-clock runs of ``fn`` in seconds (noise only ever adds time)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def memory_bandwidth_gbps(mib: int = 1024, reps: int = 5) -> dict[str, float]:
    """Main-memory bandwidth (GB/s, 1e9 bytes) with torch's current thread count.

    ``read``: ``buf.sum()`` over a buffer much larger than the caches (reads ``mib`` MiB);
    this is the traffic pattern of a weight-streaming matmul. ``copy``: ``dst.copy_(src)``
    of ``mib / 2`` MiB, counted as read + write bytes.
    """
    n = (mib << 20) // 4
    buf = torch.ones(n, dtype=torch.float32)
    read_s = best_time(lambda: buf.sum(), reps)
    half = n // 2
    src, dst = buf[:half], torch.empty(half, dtype=torch.float32)
    dst.copy_(src)  # touch the pages once so first-touch faults are not timed
    copy_s = best_time(lambda: dst.copy_(src), reps)
    return {"read": n * 4 / read_s / 1e9, "copy": 2 * half * 4 / copy_s / 1e9}


def random_prompts(count: int, seed: int, length: int = 128, vocab: int = 49152) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids in [3, vocab), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def interleaved_decode_steps(
    llm: Any, batch: int, steps: int, variants: dict[str, Callable[[], None]]
) -> dict[str, Any]:
    """``batch`` prompts of 128 random tokens (``llm``: an engine.LLM) decoded to context ~160,
    then ``steps`` rounds of one decode step per variant (its setup called first) -> context
    and median step per variant (``<variant>_step_ms``)."""
    from engine import SamplingParams
    from engine.request import Request

    eng = llm.engine
    reqs = [
        Request(f"b{batch}-{i}", p, SamplingParams(max_tokens=30 + 2 * steps, temperature=0, ignore_eos=True))
        for i, p in enumerate(random_prompts(batch, seed=11))
    ]
    for r in reqs:
        eng.add_request(r)
    while any(len(r.output_token_ids) < 30 for r in reqs):  # prefill, then reach context ~160
        eng.step()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(steps):
        for name, setup in variants.items():
            setup()
            t0 = time.perf_counter()
            eng.step()
            times[name].append(time.perf_counter() - t0)
    while eng.has_work():
        eng.step()
    return {"context": 128 + 30 + steps} | {f"{k}_step_ms": 1e3 * median(v) for k, v in times.items()}


# A random-weight Llama of SmolLM2-135M's width whose heads split at TP=2 (SmolLM2's own 9 / 3
# heads do not): the TP benchmarks' model, with ``num_hidden_layers`` and vocab set per script.
TP_WIDTH = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 36,
}


def grouped_bars(ax: Any, labels: list[str], series: dict[str, list[float]]) -> None:
    """One group of bars per label, one bar per series (legend: the series' names)."""
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(labels))], values, width, label=name)
    ax.set_xticks(list(range(len(labels))), labels)
    ax.legend(fontsize=8)


def save_results(res: dict[str, Any], out: str | Path, name: str, plot: Callable[[Path], None], table: str) -> None:
    """Write ``<out>/<name>.json`` (``res``) and ``<name>.png`` (``plot(path)``), then print
    ``table`` and where the files went, with the load averages ``res`` recorded."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    plot(out / f"{name}.png")
    print()
    print(table)
    print(f"\nwrote {out / name}.json and .png (load {res['load_before']:.1f} -> {res['load_after']:.1f})")
