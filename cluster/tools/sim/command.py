"""``splitserve sim``: simulate a cluster on a step-time table, or plan its prefill:decode split.

    splitserve sim --table FILE --workload code|conversation|FILE --rate R
                   --prefill N --decode M [--mixed K] [--duration S]
                   [--slo-ttft MS --slo-tpot MS] [--json]
    splitserve sim ... --sweep-ratio --instances N --target-rate R --slo-ttft MS --slo-tpot MS

Without ``--rate`` the trace's own arrival times are replayed (the first ``--duration``
seconds). With ``--rate`` requests arrive as a Poisson process at that rate for
``--duration`` seconds, their (prompt, output) lengths drawn from the trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cluster.argtypes import non_negative_int, positive_float, positive_int
from cluster.config import ROUTING_POLICIES, ConfigError, RouterConfig


def add_sim_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sim",
        help="simulate a prefill/decode cluster on a profiled step-time table",
        description="Discrete-event simulation of prefill, decode and mixed pools with the real routing "
        "policy; prints TTFT/TPOT/ITL/E2E percentiles and SLO goodput. --sweep-ratio plans the "
        "prefill:decode split of --instances for --target-rate.",
    )
    p.add_argument(
        "--table", metavar="FILE", help="profile table JSON (default: the shipped ILLUSTRATIVE A100 example)"
    )
    p.add_argument("--workload", default="conversation", help="code | conversation | trace CSV (default: %(default)s)")
    p.add_argument(
        "--rate", type=positive_float, metavar="R", help="Poisson arrivals at R req/s (default: replay the trace)"
    )
    p.add_argument(
        "--duration", type=positive_float, default=60.0, metavar="S", help="arrival window (default: %(default)s)"
    )
    p.add_argument("--num-requests", type=positive_int, metavar="N", help="at most N requests")
    p.add_argument("--prefill", type=non_negative_int, default=1, metavar="N", help="prefill instances (default: 1)")
    p.add_argument("--decode", type=non_negative_int, default=1, metavar="M", help="decode instances (default: 1)")
    p.add_argument("--mixed", type=non_negative_int, default=0, metavar="K", help="mixed instances (default: 0)")
    p.add_argument("--slo-ttft", type=positive_float, metavar="MS", help="TTFT SLO in milliseconds")
    p.add_argument("--slo-tpot", type=positive_float, metavar="MS", help="TPOT SLO in milliseconds")
    p.add_argument("--sweep-ratio", action="store_true", help="plan the prefill:decode split of --instances")
    p.add_argument("--instances", type=positive_int, metavar="N", help="instances to split (--sweep-ratio)")
    p.add_argument("--target-rate", type=positive_float, metavar="R", help="req/s to plan for (--sweep-ratio)")
    p.add_argument("--prefill-policy", choices=ROUTING_POLICIES, default="token_jsq")
    p.add_argument("--decode-policy", choices=ROUTING_POLICIES, default="kv")
    p.add_argument("--short-prompt-threshold", type=non_negative_int, default=32, metavar="N")
    p.add_argument("--max-mixed-workers", type=non_negative_int, default=1, metavar="N", help="role switching (0: off)")
    p.add_argument("--link-gbps", type=positive_float, default=100.0, help="KV link per prefill instance (Gbit/s)")
    p.add_argument("--link-latency-us", type=float, default=20.0, help="per-transfer latency (us)")
    p.add_argument("--whole-cache", action="store_true", help="send the KV after the prefill (not layer-wise)")
    p.add_argument("--num-blocks", type=positive_int, help="KV blocks per instance (default: the table's)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, help="token budget per step (default: the table's)")
    p.add_argument("--max-num-seqs", type=positive_int, help="running requests per instance (default: the table's)")
    p.add_argument("--max-prompt", type=positive_int, help="clip prompt lengths (e.g. to a small model's context)")
    p.add_argument("--max-output", type=positive_int, help="clip output lengths")
    p.add_argument("--dispatch-ms", type=float, default=0.0, help="routing/RPC delay per request (ms)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every step time of the table (calibration)")
    p.add_argument("--token-overhead-ms", type=float, default=0.0, help="serving cost per streamed token (calibration)")
    p.add_argument("--jitter", type=float, default=0.0, help="lognormal sigma of step-time noise (0: exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_sim)


def _router(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        short_prompt_threshold=args.short_prompt_threshold,
        max_mixed_workers=args.max_mixed_workers,
    )


def cmd_sim(args: argparse.Namespace) -> int:
    from cluster.tools.sim.metrics import format_summary
    from cluster.tools.sim.model import ProfileTable, StepTimeModel
    from cluster.tools.sim.roofline import EXAMPLE_PATH
    from cluster.tools.sim.simulator import LinkConfig, SimConfig, Simulator
    from cluster.tools.sim.workload import load_trace, poisson

    def fail(msg: str) -> int:
        print(f"splitserve sim: {msg}", file=sys.stderr)
        return 2

    try:
        table = ProfileTable.load(args.table or EXAMPLE_PATH)
        trace = load_trace(args.workload)
        if args.max_prompt or args.max_output:
            trace = trace.clipped(args.max_prompt, args.max_output)
        config = SimConfig(
            num_prefill=args.prefill,
            num_decode=args.decode,
            num_mixed=args.mixed,
            router=_router(args),
            link=LinkConfig(args.link_gbps, args.link_latency_us * 1e-6, layerwise=not args.whole_cache),
            num_blocks=args.num_blocks,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            dispatch_s=args.dispatch_ms * 1e-3,
            step_jitter=args.jitter,
            seed=args.seed,
        )
    except (OSError, ValueError, ConfigError) as e:
        return fail(str(e))
    if table.illustrative and not args.json:
        print(f"note: {args.table or EXAMPLE_PATH} is ILLUSTRATIVE: {table.source}\n", file=sys.stderr)
    slo_ttft = args.slo_ttft * 1e-3 if args.slo_ttft else None
    slo_tpot = args.slo_tpot * 1e-3 if args.slo_tpot else None
    try:
        model = StepTimeModel(table, time_scale=args.time_scale, token_overhead_s=args.token_overhead_ms * 1e-3)
    except ValueError as e:
        return fail(str(e))
    if args.sweep_ratio:
        if not (args.instances and args.target_rate and slo_ttft and slo_tpot):
            return fail("--sweep-ratio needs --instances, --target-rate, --slo-ttft and --slo-tpot")
        return _sweep(args, model, trace, config, slo_ttft, slo_tpot)
    if args.rate:
        work = poisson(trace, args.rate, duration_s=args.duration, num_requests=args.num_requests, seed=args.seed)
    else:
        work = trace
        n = sum(1 for t in trace.arrival_s if t <= args.duration)
        work = trace.head(min(n, args.num_requests or n))
    try:
        result = Simulator(model, config).run(work)
    except ValueError as e:
        return fail(str(e))
    summary = result.summary(slo_ttft, slo_tpot)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _sweep(args, model, trace, config, slo_ttft: float, slo_tpot: float) -> int:
    from cluster.tools.sim.planner import sweep_ratio

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    say(
        f"planning {args.instances} instances for {args.target_rate:g} req/s "
        f"(TTFT <= {slo_ttft * 1e3:g} ms, TPOT <= {slo_tpot * 1e3:g} ms):"
    )
    plan = sweep_ratio(
        model,
        args.instances,
        args.target_rate,
        trace,
        slo_ttft,
        slo_tpot,
        base=config,
        duration_s=args.duration,
        seed=args.seed,
        progress=say,
    )
    b = plan.best
    if args.json:
        out = {
            "best": vars(b),
            "candidates": [vars(c) for c in plan.candidates],
            "slice_instances": plan.slice_instances,
            "slice_rate": plan.slice_rate,
            "full_summary": plan.full_summary,
            "simulations": plan.simulations,
            "wall_s": plan.wall_s,
            "notes": plan.notes,
        }
        print(json.dumps(out, indent=2))
        return 0
    for note in plan.notes:
        say(f"note: {note}")
    say(
        f"\nbest split: {b.num_prefill} prefill : {b.num_decode} decode "
        f"(SLO attainment {b.attainment:.1%}, p90 TTFT {b.ttft_p90_s * 1e3:.1f} ms, "
        f"p90 TPOT {b.tpot_p90_s * 1e3:.1f} ms, goodput {b.goodput_rps:.1f} req/s)"
    )
    say(f"{plan.simulations} simulations in {plan.wall_s:.1f} s")
    return 0
