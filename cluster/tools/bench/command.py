"""``splitserve bench``: arguments, the summary table, result files and plots.

    splitserve bench --backend grpc|openai --target HOST:PORT|URL --workload SPEC
                     --num-prompts N --request-rate R|inf [--burstiness B] [--sweep R1,R2,...]
                     [--max-concurrency C] [--warmup K] [--duration S] [--goodput ttft:MS tpot:MS]
                     [--seed S] [--save-result FILE.json] [--plot DIR]
    splitserve bench --compare a.json b.json [--plot DIR]

Only argparse is imported at module level: the CLI stays fast for the other subcommands.
Exit status: 0; 1 when the benchmark failed or a run completed no request; 2 for bad arguments;
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

SUMMARY_WIDTH = 50
SECTIONS = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a running server (latency percentiles, throughput, SLO goodput)",
        description="Send a workload to a gRPC or OpenAI-compatible server on an arrival schedule and report "
        "TTFT, TPOT, ITL and E2E latency with vllm bench serve's metric names.",
    )
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc", help="client protocol (default: grpc)")
    p.add_argument("--target", help="HOST:PORT (grpc) or base URL (openai, with or without /v1)")
    p.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"), help="default: $SPLITSERVE_API_KEY")
    p.add_argument("--model", help="model name sent to an openai server (default: its first /v1/models entry)")
    p.add_argument(
        "--workload",
        default="random:1024:128",
        help="fixed:IN:OUT | random:IN:OUT[:RATIO] | azure-code | azure-conv | jsonl:PATH | trace:PATH "
        "(default: %(default)s)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply synthetic/trace lengths (default: 1)")
    p.add_argument("--vocab-size", type=int, help="synthetic token ids are drawn from [1, N) (default: the server's)")
    p.add_argument("--max-model-len", type=int, help="clip requests to this context (default: the server's)")
    p.add_argument("--num-prompts", type=int, default=1000, help="measured requests (default: %(default)s)")
    p.add_argument("--request-rate", help="mean requests/s, or inf to send all at once (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps: 1 Poisson, <1 burstier")
    p.add_argument("--sweep", metavar="R1,R2,...", help="one run per request rate, e.g. 1,2,4,inf")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured requests sent before the first rate, reported apart (default: %(default)s; 0: none)",
    )
    p.add_argument("--duration", type=float, metavar="S", help="send no request after S seconds")
    p.add_argument("--trace-speedup", type=float, default=1.0, help="trace workloads: replay this many times faster")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 (also e2el)")
    p.add_argument("--metric-percentiles", default="50,90,99", help="percentiles to report (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default: 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="generate exactly the asked tokens"
    )
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="per request (default: 600)")
    p.add_argument("--save-result", metavar="FILE.json", help="write the result (a sweep: {'runs': [...]})")
    p.add_argument("--plot", metavar="DIR", help="write latency_vs_rate.png and goodput_vs_rate.png here")
    p.add_argument("--compare", nargs="+", metavar="FILE.json", help="compare saved results instead of running")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def _config(args: argparse.Namespace):
    from cluster.tools.bench.arrivals import LoadConfig, parse_rate, parse_rates
    from cluster.tools.bench.metrics import parse_goodput
    from cluster.tools.bench.runner import BenchConfig
    from cluster.tools.bench.workloads import parse_workload

    workload = parse_workload(args.workload)
    if args.sweep and args.request_rate:
        raise ValueError("give --request-rate or --sweep, not both")
    rates = parse_rates(args.sweep) if args.sweep else [parse_rate(args.request_rate or "inf")]
    load = LoadConfig(
        request_rate=rates[0],
        burstiness=args.burstiness,
        num_requests=args.num_prompts,
        duration_s=args.duration,
        max_concurrency=args.max_concurrency,
        warmup=args.warmup,
        trace_speedup=args.trace_speedup,
    )
    try:
        percentiles = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    except ValueError:
        percentiles = ()
    if not percentiles or not all(0 <= p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles must be numbers in [0, 100], got {args.metric_percentiles!r}")
    if not (args.scale > 0 and math.isfinite(args.scale)):
        raise ValueError(f"--scale must be a finite number > 0, got {args.scale}")
    for name in ("vocab_size", "max_model_len"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 2")
    return BenchConfig(
        workload=workload,
        load=load,
        rates=tuple(rates),
        seed=args.seed,
        scale=args.scale,
        slos=parse_goodput(args.goodput),
        percentiles=percentiles,
        sampling={"temperature": args.temperature, "ignore_eos": args.ignore_eos},
        vocab_size=args.vocab_size,
        max_model_len=args.max_model_len,
        show_progress=not args.disable_tqdm,
        labels={"backend": args.backend, "target": args.target, "workload": args.workload},
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from cluster.tools.bench.plots import ResultFileError, compare_series, plot_results, save_results
    from cluster.tools.bench.runner import BenchError
    from cluster.tools.bench.workloads import WorkloadError

    def fail(code: int, msg: str) -> int:
        print(f"splitserve bench: {msg}", file=sys.stderr)
        return code

    if args.compare:
        try:
            series = compare_series(args.compare)
        except ResultFileError as e:
            return fail(2, str(e))
        print(format_comparison(series))
        if args.plot:
            for path in plot_results(series, args.plot):
                print(f"wrote {path}")
        return 0
    if not args.target:
        return fail(2, "--target is required (or --compare FILE ...)")
    try:
        cfg = _config(args)
    except (ValueError, WorkloadError) as e:
        return fail(2, str(e))
    import asyncio

    try:
        runs = asyncio.run(_run(args, cfg))
    except (BenchError, WorkloadError) as e:
        return fail(1, str(e))
    except KeyboardInterrupt:  # requests in flight were cancelled (the server aborts them)
        return fail(130, "interrupted")
    for run in runs:
        print(format_summary(run))
    if args.save_result:
        save_results(args.save_result, runs)
        print(f"wrote {args.save_result}")
    if args.plot:
        for path in plot_results({"run": runs}, args.plot):
            print(f"wrote {path}")
    return 1 if any(r["completed"] == 0 for r in runs) else 0


async def _run(args: argparse.Namespace, cfg: Any) -> list[dict]:
    from cluster.tools.bench.clients import make_client
    from cluster.tools.bench.runner import run_bench

    client = make_client(args.backend, args.target, args.api_key, args.request_timeout, args.model)
    try:
        return await run_bench(client, cfg)
    finally:
        await client.close()


# ---------------------------------------------------------------------------- tables
def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label + ':':<40} {value}"


def format_summary(run: dict) -> str:
    """The run as a vllm-style text table."""
    from cluster.tools.bench.metrics import percentile_key

    rule = lambda title, ch: f" {title} ".center(SUMMARY_WIDTH, ch)
    rows = [
        rule("Serving Benchmark Result", "="),
        _line("Successful requests", run["completed"]),
        _line("Failed requests", run.get("failed", 0)),
        _line("Request rate configured (req/s)", run.get("request_rate", "inf")),
        _line("Maximum request concurrency", run.get("max_concurrency") or "unbounded"),
        _line("Benchmark duration (s)", run["duration"]),
        _line("Total input tokens", run["total_input_tokens"]),
        _line(
            "  of which prefix-cached",
            "not reported" if run.get("cached_input_tokens") is None else run["cached_input_tokens"],
        ),
        _line("Total generated tokens", run["total_output_tokens"]),
        _line("Request throughput (req/s)", run["request_throughput"]),
    ]
    if run.get("request_goodput") is not None:
        rows.append(_line("Request goodput (req/s)", run["request_goodput"]))
        slos = " ".join(f"{k}:{v:g}" for k, v in (run.get("goodput_slos_ms") or {}).items())
        rows.append(_line("  SLOs met by every good request (ms)", slos))
    rows += [
        _line("Output token throughput (tok/s)", run["output_throughput"]),
        _line("Peak output token throughput (tok/s)", run.get("max_output_tokens_per_s", 0.0)),
        _line("Peak concurrent requests", run.get("max_concurrent_requests", 0)),
        _line("Total token throughput (tok/s)", run["total_token_throughput"]),
    ]
    for key, title, short in SECTIONS:
        rows.append(rule(title, "-"))
        rows.append(_line(f"Mean {short} (ms)", run[f"mean_{key}_ms"]))
        rows.append(_line(f"Median {short} (ms)", run[f"median_{key}_ms"]))
        for p in run.get("percentiles", []):
            if p == 50:
                continue  # the median, printed above
            name = percentile_key(p, key)
            rows.append(_line(f"{name.split('_')[0].upper()} {short} (ms)", run[name]))
    rows.append("=" * SUMMARY_WIDTH)
    errors = sorted({e for e in run.get("errors", []) if e})
    if errors:
        rows.append(f"{len(errors)} distinct error(s), e.g.: " + "; ".join(errors[:3]))
    return "\n".join(rows)


def format_comparison(series: dict[str, list[dict]]) -> str:
    head = f"{'result':<24}{'rate':>8}{'done':>6}{'req/s':>8}{'good/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
    head += f"{'TPOT p50':>10}{'TPOT p99':>10}"
    rows = [head, "-" * len(head)]
    for label, runs in series.items():
        for r in runs:
            good = r.get("request_goodput")
            rows.append(
                f"{label[:23]:<24}{str(r.get('request_rate', '?')):>8}{r['completed']:>6}"
                f"{r['request_throughput']:>8.2f}{(f'{good:.2f}' if good is not None else '-'):>8}"
                f"{r.get('median_ttft_ms', 0.0):>10.1f}{r.get('p99_ttft_ms', 0.0):>10.1f}"
                f"{r.get('median_tpot_ms', 0.0):>10.1f}{r.get('p99_tpot_ms', 0.0):>10.1f}"
            )
    return "\n".join(rows)
