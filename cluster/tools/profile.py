"""``splitserve profile``: measure engine step times on this machine for the simulator.

    splitserve profile [--model DIR] [--out FILE.json] [--prefill-tokens N ...]
                       [--batch-sizes N ...] [--context-lens N ...] [--threads N] [--quick]

One EngineCore (mixed mode, prefix caching off, random prompt ids) is timed directly:

- prefill: ``reps`` rounds over the chunk sizes T: one fresh prompt of T tokens, the wall
  time of the one ``step()`` that computes it (the engine's token budget is raised to the
  largest T so no prompt is chunked); the median per size is kept;
- decode: for every (batch size B, context length C): B prompts of C tokens are prefilled
  (untimed), then ``decode_steps`` steps of B tokens each are timed; the median is kept
  (the context grows by ``decode_steps`` during the timing, small next to C).

On a shared machine, load from other processes shows up as noise; the simulator's model
smooths the table into a non-decreasing one (isotonic regression) before use.

A step's wall time is what the worker loop pays per iteration: scheduling, tensor
building, the forward pass, sampling and the scheduler update. The table records the
serving engine's limits (``--max-num-batched-tokens``, ``--num-blocks``, ...), not the
profiling engine's, and torch's thread count (``--threads``, default 1: what a Ray worker
with ``num_cpus=1`` gets). Output: ``cluster.tools.sim.model.ProfileTable`` JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cluster.argtypes import positive_int
from cluster.tools.sim.model import ProfileTable

DEFAULT_PREFILL_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_CONTEXT_LENS = (16, 64, 256, 1024)
QUICK = {"prefill_tokens": (16, 64, 256, 1024), "batch_sizes": (1, 4, 16), "context_lens": (16, 128, 512)}


def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_average_1m"] = os.getloadavg()[0]  # a busy machine measures slow steps
    except OSError:
        pass
    return info


def profile_engine(
    model: str,
    prefill_tokens: Sequence[int] = DEFAULT_PREFILL_TOKENS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    context_lens: Sequence[int] = DEFAULT_CONTEXT_LENS,
    reps: int = 5,
    decode_steps: int = 5,
    dtype: str = "float32",
    device: str = "cpu",
    block_size: int = 16,
    num_blocks: int | None = None,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ProfileTable:
    """Time a real EngineCore on ``model`` (see module docstring); returns the table."""
    import torch

    from engine.config import ModelConfig
    from engine.engine import EngineCore
    from engine.kv_cache.layout import KVLayout
    from engine.kv_cache.paged_cache import PagedKVCache
    from engine.llm import build_engine_config
    from engine.request import Request, SamplingParams

    say = progress or (lambda _msg: None)
    mc = ModelConfig.from_hf_dir(model)
    limit = mc.max_position_embeddings
    prefill_tokens = sorted({t for t in prefill_tokens if 1 <= t < limit})
    context_lens = sorted({c for c in context_lens if 1 <= c and c + decode_steps + 1 < limit})
    batch_sizes = sorted(set(batch_sizes))
    if not prefill_tokens or not context_lens or not batch_sizes:
        raise ValueError(f"nothing to profile below the model's max_position_embeddings {limit}")
    layout = KVLayout(dtype, block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim)
    serving_blocks = num_blocks or PagedKVCache.blocks_for_memory(layout, 1.0)
    need = max(batch_sizes) * (-(-(max(context_lens) + decode_steps + 1) // block_size)) + 8
    need = max(need, -(-max(prefill_tokens) // block_size) + 8)
    engine = EngineCore(
        build_engine_config(
            model,
            dtype,
            device,
            block_size=block_size,
            num_blocks=need,
            max_num_batched_tokens=max(max(prefill_tokens), max(batch_sizes), max_num_batched_tokens),
            max_num_seqs=max(max(batch_sizes), 1),
            enable_prefix_caching=False,
        )
    )
    rng = random.Random(seed)
    ids = iter(range(1 << 62))
    vocab = mc.vocab_size

    def request(n: int, max_tokens: int) -> Request:
        prompt = [rng.randrange(3, vocab) for _ in range(n)]  # 0-2 are special in tiny models
        return Request(f"p{next(ids)}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):  # warm up allocators, kernels, caches
        engine.add_request(request(min(64, prefill_tokens[-1]), 2))
        while engine.has_work():
            engine.step()

    samples: dict[int, list[float]] = {t: [] for t in prefill_tokens}
    for _ in range(reps):  # rounds over all sizes: a burst of load on the machine hits all alike
        for t in prefill_tokens:
            engine.add_request(request(t, 1))
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            samples[t].append(time.perf_counter() - t0)
            while engine.has_work():  # nothing should be left; be safe
                engine.step()
    prefill_s = [statistics.median(samples[t]) for t in prefill_tokens]
    for t, s in zip(prefill_tokens, prefill_s):
        say(f"prefill {t:>6} tokens: {s * 1e3:8.2f} ms")

    decode_s = []
    for b in batch_sizes:
        row = []
        for c in context_lens:
            reqs = [request(c, decode_steps + 2) for _ in range(b)]
            for r in reqs:
                engine.add_request(r)
            while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in reqs):
                engine.step()
            times = []
            for _ in range(decode_steps):
                sync()
                t0 = time.perf_counter()
                engine.step()
                sync()
                times.append(time.perf_counter() - t0)
            for r in reqs:
                engine.abort(r.request_id)
            row.append(statistics.median(times))
            say(f"decode batch {b:>4} context {c:>6}: {row[-1] * 1e3:8.2f} ms")
        decode_s.append(row)

    return ProfileTable(
        prefill_tokens=tuple(prefill_tokens),
        prefill_s=tuple(prefill_s),
        decode_batch_sizes=tuple(batch_sizes),
        decode_context_lens=tuple(context_lens),
        decode_s=tuple(tuple(r) for r in decode_s),
        num_layers=mc.num_layers,
        kv_bytes_per_token=layout.page_bytes * mc.num_layers // block_size,
        block_size=block_size,
        num_blocks=serving_blocks,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        illustrative=False,
        source=(
            f"measured by `splitserve profile` on this machine: median of {reps} prefill steps and of "
            f"{decode_steps} decode steps per point, EngineCore.step() wall time"
        ),
        machine=machine_info(device),
        model={
            "path": os.path.abspath(model),
            "architecture": mc.architecture,
            "hidden_size": mc.hidden_size,
            "num_heads": mc.num_heads,
            "num_kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim,
            "vocab_size": mc.vocab_size,
        },
        engine={"dtype": dtype, "device": device, "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


# ---------------------------------------------------------------------------- CLI
def add_profile_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="measure engine step times on this machine (a step-time table for `sim`)",
        description="Time prefill steps over chunk sizes and decode steps over batch sizes x context "
        "lengths with a real EngineCore; write the table as JSON for `splitserve sim --table`.",
    )
    p.add_argument("--model", help="HF safetensors directory (default: a tiny random Llama)")
    p.add_argument("--out", default="profile.json", metavar="FILE.json", help="output (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=positive_int, nargs="+", metavar="N", help="prompt chunk sizes to time")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", metavar="N", help="decode batch sizes to time")
    p.add_argument("--context-lens", type=positive_int, nargs="+", metavar="N", help="decode context lengths to time")
    p.add_argument("--quick", action="store_true", help="a small grid (about a minute on a laptop CPU)")
    p.add_argument("--reps", type=positive_int, default=5, help="prefill repetitions per point (default: %(default)s)")
    p.add_argument(
        "--decode-steps", type=positive_int, default=5, help="timed decode steps per point (default: %(default)s)"
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--block-size", type=positive_int, default=16, help="KV block size (default: %(default)s)")
    p.add_argument("--num-blocks", type=positive_int, help="KV blocks of a serving instance (default: 1 GB worth)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="serving token budget per step")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="serving limit on running requests")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    model = args.model
    if model is None:
        from cluster.config import DEFAULT_TINY_DIR
        from engine.models.tiny import build_tiny_checkpoint

        print(f"no --model given: using a tiny random-weight Llama in {DEFAULT_TINY_DIR}", flush=True)
        model = build_tiny_checkpoint(DEFAULT_TINY_DIR, family="llama")
    if not os.path.isfile(os.path.join(model, "config.json")):
        print(f"splitserve profile: {model!r} is not a directory with a config.json", file=sys.stderr)
        return 2
    grid = QUICK if args.quick else {}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        table = profile_engine(
            model,
            prefill_tokens=args.prefill_tokens or grid.get("prefill_tokens", DEFAULT_PREFILL_TOKENS),
            batch_sizes=args.batch_sizes or grid.get("batch_sizes", DEFAULT_BATCH_SIZES),
            context_lens=args.context_lens or grid.get("context_lens", DEFAULT_CONTEXT_LENS),
            reps=args.reps,
            decode_steps=args.decode_steps,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            progress=lambda m: print(m, flush=True),
        )
    except ValueError as e:
        print(f"splitserve profile: {e}", file=sys.stderr)
        return 2
    table.save(args.out)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0
