"""Benchmark (not a test): latency against request rate with speculative decoding, through
``splitserve serve`` + ``splitserve bench`` (issue 12's benchmark).

    .venv/bin/python benchmarks/spec_sweep.py [--quick] [--rates 0.3,2,8] [--runs 3]
        [--num-prompts 8] [--workloads ngram,draft] [--draft-layers 24] [--out spec_sweep]

For each workload and each variant (no speculation = k 0, fixed k 1 / 3 / 5, SmartSpec with
K = 5) it starts a serving cluster, ``splitserve serve --config CFG --speculative-config
JSON`` (its own local Ray; ONE mixed-pool worker with num_cpus=1, i.e. colocated prefill
and decode with one torch thread, prefix caching off so that the repeating JSONL prompts
never hit a cache, torch kernels: SPLITSERVE_NATIVE=0, see SERVE_ENV), then drives it with ``splitserve bench``'s runner
(cluster/tools/bench/runner.py, gRPC client; greedy, ignore_eos) at every rate, ``--runs``
times, rates interleaved (r1 r2 r3 r1 r2 r3 ...) so a burst of load from the machine's
other users hits every rate alike; repeat r sends its own slice of the shuffled prompt file
(``prompt_subsets``), the same at every rate and in every variant. Per run it records the bench result (mean/P99 TPOT and
E2E, ...), ``os.getloadavg()`` before and after, and the spec metrics the server exports
(``/metrics``: splitserve_spec_draft_tokens_total, splitserve_spec_accepted_tokens_total,
the splitserve_spec_chosen_k histogram; differences over the run): acceptance rate and
the mean chosen k per request-step. A point is the median of its runs.

Workloads (benchmarks/data/README.md):
    ngram   SmolLM2-135M-Instruct (the model ``serve`` fetches) with the n-gram proposer
            on benchmarks/data/lookup_prompts.jsonl (quote / rewrite / summarise a text)
    draft   the same target with its self-draft (``splitserve draft --from MODEL --layers N
            --out DIR``, built once into $SPLITSERVE_CACHE/drafts) on chat_prompts.jsonl

Targets (mean TPOT and mean E2E; P99 alongside): SmartSpec within 1.10x of the best fixed
k at every rate; <= 0.8x of k 0 at the lowest rate; <= 1.05x of k 0 at the highest; the
mean chosen k falls as the rate rises. The script prints and stores each as met / not met.

Writes benchmarks/results/OUT.json, OUT_latency.png (mean and P99 TPOT and E2E against
rate, one colour per variant, one row per workload) and OUT_chosen_k.png (SmartSpec's
mean chosen k and acceptance against rate). ``--quick``: k 0 and SmartSpec, 2 rates, 1
run of 4 prompts per point (a smoke run, ~5 minutes). The full default sweep takes ~30
minutes on the 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS_DIR, machine_description  # noqa: E402
from cluster.tools.bench.arrivals import LoadConfig  # noqa: E402
from cluster.tools.bench.clients import make_client  # noqa: E402
from cluster.tools.bench.plots import new_figure, series_colors  # noqa: E402
from cluster.tools.bench.runner import BenchConfig, run_bench  # noqa: E402
from cluster.tools.bench.workloads import parse_workload  # noqa: E402

DATA = REPO / "benchmarks" / "data"
SPLITSERVE = str(Path(sys.executable).with_name("splitserve"))
K_MAX = 5  # SmartSpec chooses k in 0..K_MAX; the fixed variants are k 1, 3, 5
STATS = ("mean_tpot_ms", "p99_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "request_throughput")
# Every variant runs the engine's torch kernels (SPLITSERVE_NATIVE=0), as the reliability
# benchmarks do: on the shared machine each server start of the sweep found the native
# kernels under a new build key and recompiled them (minutes per start under load), and a
# variant must not run other kernels than its baseline.
SERVE_ENV = {"SPLITSERVE_NATIVE": "0"}
SPEC_METRICS = ("splitserve_spec_draft_tokens_total", "splitserve_spec_accepted_tokens_total")


@dataclass(frozen=True)
class Variant:
    name: str  # "k0", "k1", "k3", "k5", "smartspec"
    k: int  # num_speculative_tokens (0: no speculative_config at all)
    policy: str  # "fixed" | "smartspec"

    def spec_config(self, method: str, draft: str | None) -> dict | None:
        if self.k == 0:
            return None
        cfg: dict = {"method": method, "num_speculative_tokens": self.k, "policy": self.policy}
        if method == "draft_model":
            cfg["model"] = draft
        return cfg


VARIANTS = (
    Variant("k0", 0, "fixed"),
    Variant("k1", 1, "fixed"),
    Variant("k3", 3, "fixed"),
    Variant("k5", 5, "fixed"),
    Variant("smartspec", K_MAX, "smartspec"),
)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str  # "ngram" | "draft"
    method: str  # speculative_config method
    prompts: Path  # JSONL (cluster/tools/bench/workloads.py read_jsonl)


WORKLOADS = {
    "ngram": WorkloadSpec("ngram", "ngram", DATA / "lookup_prompts.jsonl"),
    "draft": WorkloadSpec("draft", "draft_model", DATA / "chat_prompts.jsonl"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- model, draft
def target_model() -> str:
    from cluster.model_store import fetch_model

    return fetch_model()


def self_draft(model: str, layers: int) -> str:
    """The self-draft of ``model``'s first ``layers`` layers, built once by ``splitserve draft``."""
    cache = Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))
    out = cache / "drafts" / f"{Path(model).stem}-L{layers}"
    if not (out / "config.json").exists():
        log(f"building the self-draft: splitserve draft --from {model} --layers {layers} --out {out}")
        subprocess.run([SPLITSERVE, "draft", "--from", model, "--layers", str(layers), "--out", str(out)], check=True)
    return str(out)


# ---------------------------------------------------------------------------- the server
class Server:
    """``splitserve serve`` in its own session (process group), stopped by SIGINT to it."""

    def __init__(self, model: str, spec: dict | None, workdir: Path, tag: str):
        self.grpc_port, self.http_port = free_port(), free_port()
        cfg = workdir / f"serve-{tag}.json"
        cfg.write_text(
            json.dumps(
                {
                    "model": model,
                    "pools": [
                        {
                            "name": "mixed",
                            "role": "mixed",
                            "num_workers": 1,
                            "num_cpus": 1,
                            "engine": {"enable_prefix_caching": False, "max_num_seqs": 64},
                        }
                    ],
                    "metrics_port": None,
                }
            )
        )
        cmd = [SPLITSERVE, "serve", "--config", str(cfg), "--num-cpus", "2", "--max-tokens", "4"]
        cmd += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--host", "127.0.0.1"]
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec)]
        self.log_path = workdir / f"serve-{tag}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(REPO), **SERVE_ENV}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.target = f"127.0.0.1:{self.grpc_port}"

    async def wait_ready(self, timeout_s: float = 400.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"splitserve serve exited with {self.proc.returncode}; see {self.log_path}")
            client = make_client("grpc", self.target, timeout_s=5.0)
            try:
                await client.info()
                if self.metrics() is not None:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            finally:
                await client.close()
            await asyncio.sleep(2.0)  # polling a starting server, not synchronisation
        raise RuntimeError(f"splitserve serve not ready after {timeout_s:.0f} s; see {self.log_path}")

    def metrics(self) -> dict[str, float] | None:
        """The spec counters and the chosen-k histogram's sum and count, summed over workers
        (zeros for a server that does not speculate); None when /metrics is unreachable."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        want = {*SPEC_METRICS, "splitserve_spec_chosen_k_sum", "splitserve_spec_chosen_k_count"}
        want.add("splitserve_spec_proposer_faults_total")
        out = dict.fromkeys(want, 0.0)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in out:
                    out[s.name] += s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # our own session: serve and its Ray
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------- one variant
def prompt_subsets(workload: WorkloadSpec, runs: int, num_prompts: int, seed: int, workdir: Path) -> list[Path]:
    """One JSONL file per repeat: ``num_prompts`` lines of the workload's file, shuffled once
    (``seed``) and taken in consecutive slices (cyclically), so each repeat sends other
    prompts (a jsonl workload sends a file's first N lines, and greedy decoding of the same
    prompts would repeat the same run) while every rate and variant of a repeat sends the
    same ones."""
    import random

    lines = [ln for ln in workload.prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
    random.Random(seed).shuffle(lines)
    paths = []
    for rep in range(runs):
        path = workdir / f"{workload.name}-rep{rep}.jsonl"
        path.write_text("\n".join(lines[(rep * num_prompts + i) % len(lines)] for i in range(num_prompts)) + "\n")
        paths.append(path)
    return paths


async def run_variant(
    server: Server, workload: WorkloadSpec, rates: list[float], subsets: list[Path], seed: int
) -> list[dict]:
    """Every (repeat, rate) run against a ready server (repeat r sends ``subsets[r]``); each
    result dict gains ``repeat``, ``load_before`` / ``load_after`` (os.getloadavg()) and
    ``spec`` (metric differences)."""
    client = make_client("grpc", server.target, timeout_s=600.0)
    results = []
    try:
        for rep, subset in enumerate(subsets):
            num_prompts = sum(1 for ln in subset.read_text().splitlines() if ln.strip())
            for i, rate in enumerate(rates):
                cfg = BenchConfig(
                    workload=parse_workload(f"jsonl:{subset}"),
                    load=LoadConfig(request_rate=rate, num_requests=num_prompts, warmup=2 if rep == i == 0 else 0),
                    rates=(rate,),
                    seed=seed + 100 * rep + i,
                    show_progress=False,
                    labels={"backend": "grpc", "target": server.target, "workload": f"jsonl:{workload.prompts.name}"},
                )
                before_load, before = os.getloadavg(), server.metrics()
                (res,) = await run_bench(client, cfg, say=log)
                await asyncio.sleep(2.5)  # the router polls worker stats every second: let /metrics catch up
                after_load, after = os.getloadavg(), server.metrics()
                res.pop("itls", None)  # every inter-token gap (~10 kB a run); their percentiles stay
                res["repeat"] = rep
                res["load_before"], res["load_after"] = before_load, after_load
                res["spec"] = spec_delta(before, after)
                log(
                    f"  rate {rate:g} run {rep}: TPOT mean {res['mean_tpot_ms']:.1f} ms p99 {res['p99_tpot_ms']:.1f}, "
                    f"E2E mean {res['mean_e2el_ms']:.0f} ms p99 {res['p99_e2el_ms']:.0f}, "
                    f"k {res['spec']['mean_chosen_k']}, acc {res['spec']['acceptance_rate']}, "
                    f"done {res['completed']}/{num_prompts}, load {before_load[0]:.2f}->{after_load[0]:.2f}"
                )
                results.append(res)
    finally:
        await client.close()
    return results


def spec_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    if before is None or after is None:
        raise RuntimeError("the server's /metrics did not answer around a run")
    d = {k: after[k] - before[k] for k in after}
    proposed, accepted = d["splitserve_spec_draft_tokens_total"], d["splitserve_spec_accepted_tokens_total"]
    n = d["splitserve_spec_chosen_k_count"]
    return {
        "draft_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
        "decisions": n,  # request-steps the policy chose a k for
        "mean_chosen_k": round(d["splitserve_spec_chosen_k_sum"] / n, 3) if n else 0.0,
        "proposer_faults": d["splitserve_spec_proposer_faults_total"],
    }


# ---------------------------------------------------------------------------- summary
def points(runs: list[dict], rates: list[float]) -> list[dict]:
    """One point per rate: the median of its runs' STATS, chosen k and acceptance."""
    out = []
    for rate in rates:
        rs = [r for r in runs if float(r["request_rate"]) == rate]
        p = {"rate": rate, "runs": len(rs)}
        for key in STATS:
            p[key] = statistics.median(r[key] for r in rs)
        p["mean_chosen_k"] = statistics.median(r["spec"]["mean_chosen_k"] for r in rs)
        acc = [r["spec"]["acceptance_rate"] for r in rs if r["spec"]["acceptance_rate"] is not None]
        p["acceptance_rate"] = statistics.median(acc) if acc else None
        p["draft_tokens"] = sum(r["spec"]["draft_tokens"] for r in rs)
        p["accepted_tokens"] = sum(r["spec"]["accepted_tokens"] for r in rs)
        p["proposer_faults"] = sum(r["spec"]["proposer_faults"] for r in rs)
        p["completed"] = sum(r["completed"] for r in rs)
        p["sent"] = sum(r["num_prompts"] for r in rs)
        p["load_1min"] = [round(r["load_before"][0], 2) for r in rs]
        out.append(p)
    return out


def check_targets(by_variant: dict[str, list[dict]]) -> list[dict]:
    """The issue's targets on mean TPOT and mean E2E, each met or not, with the ratio."""
    if "smartspec" not in by_variant or "k0" not in by_variant:
        return []
    smart, plain = by_variant["smartspec"], by_variant["k0"]
    fixed = [v for v in by_variant if v != "smartspec"]
    checks = []
    for metric in ("mean_tpot_ms", "mean_e2el_ms"):
        for i, p in enumerate(smart):
            best_name = min(fixed, key=lambda v: by_variant[v][i][metric])
            best = by_variant[best_name][i][metric]
            ratio = p[metric] / best
            checks.append(
                {
                    "target": f"{metric} at {p['rate']:g} req/s: SmartSpec <= 1.10x best fixed ({best_name})",
                    "ratio": round(ratio, 3),
                    "met": ratio <= 1.10,
                }
            )
        lo, hi = smart[0][metric] / plain[0][metric], smart[-1][metric] / plain[-1][metric]
        checks.append(
            {"target": f"{metric} at the lowest rate: SmartSpec <= 0.8x k0", "ratio": round(lo, 3), "met": lo <= 0.8}
        )
        checks.append(
            {"target": f"{metric} at the highest rate: SmartSpec <= 1.05x k0", "ratio": round(hi, 3), "met": hi <= 1.05}
        )
    ks = [p["mean_chosen_k"] for p in smart]
    checks.append({"target": f"chosen k falls as the rate rises ({ks})", "ratio": None, "met": ks[-1] < ks[0]})
    return checks


def log_rate_axis(ax, rates: list[float]) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(rates, [f"{r:g}" for r in rates])


def plot(result: dict, out: Path) -> list[Path]:
    workloads = result["workloads"]
    fig, axes = new_figure(len(workloads), 2, (11, 4.2 * len(workloads)))
    for row, (wname, wl) in enumerate(workloads.items()):
        names = list(wl["points"])
        for col, metric in enumerate(("tpot", "e2el")):
            ax = axes[row][col]
            for name, color in zip(names, series_colors(len(names))):
                pts = wl["points"][name]
                x = [p["rate"] for p in pts]
                ax.plot(x, [p[f"mean_{metric}_ms"] for p in pts], "-o", color=color, label=f"{name} mean")
                ax.plot(x, [p[f"p99_{metric}_ms"] for p in pts], ":", color=color, label=f"{name} P99")
            ax.set_title(f"{wname}: {'time per output token' if metric == 'tpot' else 'end-to-end latency'}")
            log_rate_axis(ax, result["args"]["rates"])
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel("ms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small", ncol=2)
    lat = out.with_name(out.name + "_latency.png")
    fig.savefig(lat, dpi=100)
    fig, axes = new_figure(1, 2, (11, 4.5))
    for (wname, wl), color in zip(workloads.items(), series_colors(len(workloads))):
        for name, style in (("smartspec", "-o"), ("k5", "--s")):
            pts = wl["points"].get(name)
            if not pts:
                continue
            x = [p["rate"] for p in pts]
            axes[0][0].plot(x, [p["mean_chosen_k"] for p in pts], style, color=color, label=f"{wname} {name}")
            acc = [p["acceptance_rate"] if p["acceptance_rate"] is not None else math.nan for p in pts]
            axes[0][1].plot(x, acc, style, color=color, label=f"{wname} {name}")
    axes[0][0].set_title("mean chosen k per request-step")
    axes[0][1].set_title("acceptance rate (accepted / verified drafts)")
    for ax in axes[0]:
        log_rate_axis(ax, result["args"]["rates"])
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ck = out.with_name(out.name + "_chosen_k.png")
    fig.savefig(ck, dpi=100)
    return [lat, ck]


def table(result: dict) -> str:
    rows = []
    for wname, wl in result["workloads"].items():
        rows.append(f"\n{wname} ({wl['prompts']}):")
        rows.append("| variant | rate | TPOT mean | TPOT P99 | E2E mean | E2E P99 | mean k | acceptance | load 1 min |")
        rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, pts in wl["points"].items():
            for p in pts:
                acc = "-" if p["acceptance_rate"] is None else f"{p['acceptance_rate']:.2f}"
                rows.append(
                    f"| {name} | {p['rate']:g} | {p['mean_tpot_ms']:.1f} | {p['p99_tpot_ms']:.1f} | "
                    f"{p['mean_e2el_ms']:.0f} | {p['p99_e2el_ms']:.0f} | {p['mean_chosen_k']:.2f} | {acc} | "
                    f"{', '.join(f'{x:.1f}' for x in p['load_1min'])} |"
                )
        for c in wl["targets"]:
            ratio = "" if c["ratio"] is None else f" ({c['ratio']:.2f}x)"
            rows.append(f"- {'met' if c['met'] else 'NOT met'}: {c['target']}{ratio}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- main
async def sweep(args: argparse.Namespace) -> dict:
    model = target_model()
    variants = [v for v in VARIANTS if v.name in args.variants]
    result: dict = {
        "machine": machine_description(),
        "model": model,
        "args": vars(args),
        "topology": "colocated: one mixed-pool worker (num_cpus=1, one torch thread), prefix caching off",
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="spec_sweep-") as tmp:
        for wname in args.workloads:
            wl = WORKLOADS[wname]
            draft = self_draft(model, args.draft_layers) if wl.method == "draft_model" else None
            subsets = prompt_subsets(wl, args.runs, args.num_prompts, args.seed, Path(tmp))
            runs: dict[str, list[dict]] = {}
            for v in variants:
                spec = v.spec_config(wl.method, draft)
                log(f"{wname}/{v.name}: serve --speculative-config {json.dumps(spec) if spec else '(none)'}")
                server = Server(model, spec, Path(tmp), f"{wname}-{v.name}")
                try:
                    await server.wait_ready()
                    runs[v.name] = await run_variant(server, wl, args.rates, subsets, args.seed)
                finally:
                    server.stop()
            pts = {name: points(rs, args.rates) for name, rs in runs.items()}
            result["workloads"][wname] = {
                "prompts": str(wl.prompts.relative_to(REPO)),
                "method": wl.method,
                "draft": draft,
                "draft_layers": args.draft_layers if draft else None,
                "points": pts,
                "targets": check_targets(pts),
                "runs": runs,
            }
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="k0 and SmartSpec, 2 rates, 1 run of 4 prompts")
    ap.add_argument("--rates", default="0.3,2,8", help="request rates, lowest first (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="runs per point (default: %(default)s)")
    ap.add_argument("--num-prompts", type=int, default=8, help="requests per run (default: %(default)s)")
    ap.add_argument("--workloads", default="ngram,draft")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    ap.add_argument("--draft-layers", type=int, default=24, help="self-draft layers (default: %(default)s of 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results name (default: spec_sweep, or spec_sweep_quick)")
    ap.add_argument("--replot", metavar="FILE.json", help="redraw the plots and the table of a saved result")
    args = ap.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        result = json.loads(path.read_text())
        for p in plot(result, path.with_suffix("")):
            log(f"wrote {p}")
        print(table(result))
        return
    if args.quick:
        args.rates, args.runs, args.num_prompts, args.variants = "0.3,8", 1, 4, "k0,smartspec"
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.rates != sorted(args.rates):
        ap.error("--rates must be given lowest first")
    args.workloads = args.workloads.split(",")
    args.variants = args.variants.split(",")
    unknown = [w for w in args.workloads if w not in WORKLOADS] + [
        v for v in args.variants if v not in {x.name for x in VARIANTS}
    ]
    if unknown:
        ap.error(f"unknown workload or variant: {unknown}")
    out = RESULTS_DIR / (args.out or ("spec_sweep_quick" if args.quick else "spec_sweep"))
    t0 = time.perf_counter()
    result = asyncio.run(sweep(args))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    for p in plot(result, out):
        log(f"wrote {p}")
    print(table(result))
    log(f"wrote {out.with_suffix('.json')} after {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
