"""Engine output throughput vs Hugging Face transformers, and decode step time vs bandwidth.

    .venv/bin/python benchmarks/engine_throughput.py            # ~2-4 min on 2 quiet CPU cores
    .venv/bin/python benchmarks/engine_throughput.py --quick    # < 1 min smoke run
    .venv/bin/python benchmarks/engine_throughput.py --threads 1   # -> engine_throughput_t1.*

Everything runs in ONE process so the numbers are ratios taken on the same (noisy, shared)
machine within minutes of each other. For each model (a tiny Llama and a ~100M-parameter
Llama, random weights written by ``engine.models.tiny``) and each batch size it times:

- ``LLM.generate`` (engine, greedy, ``ignore_eos``, prefix caching off so repeated prompts
  do not hit the cache) over ``batch`` prompts of 16-48 random tokens;
- transformers ``generate`` on the same weights and prompts: one left-padded batch with an
  attention mask, greedy, ``generation_config.eos_token_id = None`` so it also produces
  exactly ``output_len`` tokens per prompt.

The last case of the ~100M model draws each request's prompt and output length from the Azure
conversation trace excerpt (lengths / TRACE_SCALE): what a served batch looks like. Uniform
cases give transformers its best case (no padding waste, no early finisher); the trace case
shows what static batching costs it next to the engine's continuous batching.

Throughput = output tokens generated / wall time of the whole call (prefill included), best of
``--repeats`` alternating runs (fast cases run more often, until they have taken 3 s). "match"
is the fraction of sequences whose engine tokens equal transformers' tokens; "detok share" is
the part of the engine's time that LLM.generate spends in its per-request
IncrementalDetokenizer (timed by replaying it over the same outputs). The 1-minute load
average before/after each case is recorded: the machine is shared, and a busy neighbour
stalls multi-threaded kernels far more than single-threaded ones.

Decode step: after prefilling one prompt, the median wall time of ``EngineCore.step()``
(one token for one sequence) on the ~100M model, next to transformers' own batch-1 decode
forward and the memory-bandwidth bound = bytes read per step (every weight matrix once
plus the sequence's K/V) / main-memory read bandwidth (``buf.sum()`` over 1 GiB), measured
just before and just after the engine's steps (the higher value is used: the stricter bound).

Writes ``benchmarks/results/engine_throughput.{json,png}`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_description, median, memory_bandwidth_gbps  # noqa: E402
from benchmarks.engine_probes import bytes_per_decode_step, decode_step_ms  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.models.tiny import build_tiny_checkpoint  # noqa: E402
from engine.tokenizer import IncrementalDetokenizer  # noqa: E402

# name -> build_tiny_checkpoint overrides (family "llama")
MODELS: dict[str, dict] = {
    "tiny": {},  # 2 layers, hidden 64, vocab 512 (~0.2M parameters): per-step overhead dominates
    "llama-100m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
}
# Output length TRACE: per-request prompt and output lengths drawn from the Azure LLM
# conversation trace excerpt shipped with the simulator, divided by TRACE_SCALE so a CPU can
# run it. transformers serves such a batch statically (prompts left-padded to the longest,
# every row decoded until the longest output is done); the engine batches continuously.
TRACE = "trace"
TRACE_CSV = REPO / "cluster" / "sim" / "data" / "azure_conv_500.csv"
TRACE_SCALE = 16
# (model, batch, output tokens per sequence or TRACE)
FULL_CASES = [
    ("tiny", 1, 128),
    ("tiny", 8, 128),
    ("tiny", 64, 128),
    ("llama-100m", 1, 128),
    ("llama-100m", 8, 128),
    ("llama-100m", 64, 32),
    ("llama-100m", 64, TRACE),
]
QUICK_CASES = [
    ("tiny", 1, 64),
    ("tiny", 8, 64),
    ("tiny", 64, 32),
    ("llama-100m", 1, 32),
    ("llama-100m", 8, 32),
    ("llama-100m", 64, 8),
    ("llama-100m", 64, TRACE),
]
PROMPT_LEN = (16, 48)  # prompt lengths are drawn uniformly from this range
MIN_CASE_S, MAX_RUNS = 3.0, 10  # fast cases are repeated until they have run this long


@dataclass
class ThroughputRow:
    model: str
    params_m: float
    batch: int
    output_len: float  # mean output tokens per sequence (all equal unless workload == TRACE)
    engine_s: float
    hf_s: float
    engine_tok_s: float
    hf_tok_s: float
    speedup: float
    match: float  # fraction of sequences with identical tokens
    detok_share: float  # fraction of the engine's time spent in incremental detokenization
    load: tuple[float, float]  # 1-minute load average before / after the case (noise indicator)
    workload: str = "uniform"  # "uniform" (prompt lengths PROMPT_LEN, equal outputs) or TRACE


@dataclass
class DecodeRow:
    model: str
    context_len: int
    engine_step_ms: float
    hf_step_ms: float
    weight_mb: float  # bytes read per step: weights + the sequence's K/V (1e6 bytes)
    read_gbps: float
    bound_ms: float
    engine_over_bound: float


def make_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(PROMPT_LEN[0], PROMPT_LEN[1] + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]  # ids 0-2 are special


def trace_workload(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """``n`` (prompt, output length) pairs sampled from the Azure conversation trace excerpt,
    both lengths divided by TRACE_SCALE (at least 1 token each)."""
    import csv

    with open(TRACE_CSV, newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(rows), (n,), generator=g).tolist()
    prompt_lens = [max(1, rows[i][0] // TRACE_SCALE) for i in picks]
    out_lens = [max(1, rows[i][1] // TRACE_SCALE) for i in picks]
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in prompt_lens], out_lens


def run_engine(llm: LLM, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    assert [len(o.token_ids) for o in outs] == out_lens
    return dt, [o.token_ids for o in outs]


def detokenize_seconds(llm: LLM, outputs: list[list[int]]) -> float:
    """Time LLM.generate spends detokenizing: replay its IncrementalDetokenizer over the outputs."""
    t0 = time.perf_counter()
    for ids in outputs:
        detok = IncrementalDetokenizer(llm.tokenizer)
        for t in ids:
            detok.append(t)
    return time.perf_counter() - t0


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, list[list[int]]]:
    """One static batch: left-padded prompts, every row decoded for max(out_lens) tokens, then
    each row cut to its own length (what serving a mixed batch with generate() costs)."""
    out_len = max(out_lens)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)  # pad id 0, left padding
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] == width + out_len
    return dt, [row[:n] for row, n in zip(out[:, width:].tolist(), out_lens, strict=True)]


def load_hf(path: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_decode_step_ms(model, prompt: list[int], steps: int) -> float:
    """Median wall time of one transformers forward of one new token with a KV cache + argmax."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def markdown_tables(rows: list[ThroughputRow], decode: list[DecodeRow]) -> str:
    lines = [
        "| model | params | batch | out tokens/seq | engine tok/s | HF tok/s | engine / HF | tokens match "
        "| detok share | load before/after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model}{' (trace)' if r.workload == TRACE else ''} | {r.params_m:.1f}M | {r.batch} | "
            f"{r.output_len:.0f}{' (mean)' if r.workload == TRACE else ''} | {r.engine_tok_s:,.0f} | "
            f"{r.hf_tok_s:,.0f} | {r.speedup:.2f}x | {r.match:.0%} | {r.detok_share:.1%} | "
            f"{r.load[0]:.1f} / {r.load[1]:.1f} |"
        )
    lines += [
        "",
        "| model | context | engine step | HF step | bytes/step | read bandwidth | bound | engine / bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in decode:
        lines.append(
            f"| {d.model} | {d.context_len} | {d.engine_step_ms:.1f} ms | {d.hf_step_ms:.1f} ms | "
            f"{d.weight_mb:.0f} MB | {d.read_gbps:.1f} GB/s | {d.bound_ms:.1f} ms | {d.engine_over_bound:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[ThroughputRow], decode: list[DecodeRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    labels = [f"{r.model}\nbatch {r.batch}" + ("\ntrace lengths" if r.workload == TRACE else "") for r in rows]
    x = range(len(rows))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r.engine_tok_s for r in rows], w, label="engine LLM.generate")
    ax.bar([i + w / 2 for i in x], [r.hf_tok_s for r in rows], w, label="transformers generate")
    for i, r in enumerate(rows):
        ax.annotate(f"{r.speedup:.1f}x", (i - w / 2, r.engine_tok_s), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens / s (log)")
    ax.set_title("Greedy generation throughput (fp32, CPU)")
    ax.legend(fontsize=8)
    if decode:
        d = decode[0]
        vals = [d.engine_step_ms, d.hf_step_ms, d.bound_ms]
        ax2.bar(["engine", "HF", "bandwidth\nbound"], vals, color=["C0", "C1", "C2"])
        for i, v in enumerate(vals):
            ax2.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax2.set_ylabel("ms per decode step")
        ax2.set_title(f"{d.model} decode, batch 1", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short output lengths (~1 minute)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=None, help="runs per case, best kept (default 3, --quick 1)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--checkpoints", default="/tmp/splitserve_bench", help="where random checkpoints are cached")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON and PNG")
    args = ap.parse_args()

    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    cases = [c for c in (QUICK_CASES if args.quick else FULL_CASES) if c[0] in models]
    repeats = args.repeats or (1 if args.quick else 3)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    bw = memory_bandwidth_gbps()
    print(f"memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s", flush=True)

    rows: list[ThroughputRow] = []
    decode: list[DecodeRow] = []
    t_start = time.perf_counter()
    for name in models:
        path = build_tiny_checkpoint(os.path.join(args.checkpoints, name), "llama", **MODELS[name])
        llm = LLM(path, max_num_seqs=256, enable_prefix_caching=False)
        hf = load_hf(path)
        vocab = llm.engine.config.model.vocab_size
        params_m = sum(p.numel() for p in hf.parameters()) / 1e6
        warm = make_prompts(2, vocab, seed=1)
        run_engine(llm, warm, [4, 4])  # first calls pay one-off allocation / thread start-up costs
        run_hf(hf, warm, [4, 4])
        model_cases = [c for c in cases if c[0] == name]
        for _, batch, out_len in tqdm(model_cases, desc=f"{name} ({params_m:.1f}M params)", unit="case"):
            if out_len == TRACE:
                prompts, out_lens = trace_workload(batch, vocab, seed=batch)
            else:
                prompts, out_lens = make_prompts(batch, vocab, seed=batch), [out_len] * batch
            load0 = os.getloadavg()[0]
            e_s = h_s = float("inf")
            runs = spent = 0.0
            # Alternate engine / HF and keep each one's best (noise only adds time): at least
            # ``repeats`` runs, more (up to MAX_RUNS) while a case has taken under MIN_CASE_S.
            while runs < repeats or (spent < MIN_CASE_S and runs < MAX_RUNS):
                e, e_tok = run_engine(llm, prompts, out_lens)
                h, h_tok = run_hf(hf, prompts, out_lens)
                e_s, h_s, runs, spent = min(e_s, e), min(h_s, h), runs + 1, spent + e + h
            n = sum(out_lens)
            row = ThroughputRow(
                name, params_m, batch, n / batch, e_s, h_s, n / e_s, n / h_s, h_s / e_s,
                sum(a == b for a, b in zip(e_tok, h_tok, strict=True)) / batch,
                detokenize_seconds(llm, e_tok) / e_s, (load0, os.getloadavg()[0]),
                TRACE if out_len == TRACE else "uniform",
            )  # fmt: skip
            rows.append(row)
            tqdm.write(
                f"  batch {batch:3d} x {row.output_len:5.1f} tokens ({row.workload}): engine {row.engine_tok_s:8.1f} tok/s, "
                f"HF {row.hf_tok_s:8.1f} tok/s ({row.speedup:.2f}x), match {row.match:.0%}, "
                f"load {row.load[0]:.1f}/{row.load[1]:.1f}"
            )
        if name == "llama-100m":
            steps = 16 if args.quick else 48
            prompt = make_prompts(1, vocab, seed=7)[0]
            print(f"  decode step: {steps} engine steps and {steps} transformers steps at batch 1", flush=True)
            # The bandwidth this VM gets drifts with its neighbours: measure it right before and
            # after the engine's steps and keep the higher value (the stricter bound).
            read_gbps = memory_bandwidth_gbps()["read"]
            e_ms = decode_step_ms(llm, prompt, steps)
            read_gbps = max(read_gbps, memory_bandwidth_gbps()["read"])
            h_ms = hf_decode_step_ms(hf, prompt, steps)
            ctx = len(prompt) + steps // 2  # mean context length over the timed steps
            nbytes = bytes_per_decode_step(llm, ctx)
            bound_ms = 1e3 * nbytes / (read_gbps * 1e9)
            decode.append(DecodeRow(name, ctx, e_ms, h_ms, nbytes / 1e6, read_gbps, bound_ms, e_ms / bound_ms))
            print(
                f"  engine {e_ms:.1f} ms, HF {h_ms:.1f} ms, bound {bound_ms:.1f} ms ({read_gbps:.1f} GB/s)", flush=True
            )
        del llm, hf

    table = markdown_tables(rows, decode)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        "engine_throughput"
        + ("_quick" if args.quick else "")
        + ("" if args.threads == os.cpu_count() else f"_t{args.threads}")
    )
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/engine_throughput.py", *sys.argv[1:]]),
        "machine": machine,
        "memory_bandwidth_gbps": bw,
        "threads": args.threads,
        "repeats": repeats,
        "throughput": [asdict(r) for r in rows],
        "decode": [asdict(d) for d in decode],
        "wall_s": time.perf_counter() - t_start,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, decode, out / f"{stem}.png")
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
