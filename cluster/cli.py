"""``splitserve`` command line: the parser and the dispatch, nothing else.

    splitserve serve    run the pools as Ray actors and serve (cluster/serve.py)
    splitserve bench    load generator (cluster/tools/bench/command.py)
    splitserve profile  step-time tables of this machine (cluster/tools/profile.py)
    splitserve sim      cluster simulator (cluster/tools/sim/command.py)
    splitserve draft    build a self-draft model for speculative decoding (cluster/tools/draft.py)
    splitserve route-log  record a MoE model's expert routing (cluster/tools/route_log.py)

Each subcommand registers itself with an ``add_<name>_parser(subparsers)`` that sets
``func``; ``main`` parses and dispatches. Importing this module imports no Ray.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cluster.serve import add_serve_parser
from cluster.tools.bench.command import add_bench_parser
from cluster.tools.draft import add_draft_parser
from cluster.tools.route_log import add_route_log_parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitserve", description="Disaggregated (prefill/decode) LLM serving on Ray.")
    ap.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="Python logging level (default: %(default)s)",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_bench_parser(sub)
    _add_profile(sub)
    _add_sim(sub)
    add_draft_parser(sub)
    add_route_log_parser(sub)
    return ap


def _add_profile(sub: Any) -> None:
    from cluster.tools.profile import add_profile_parser

    add_profile_parser(sub)


def _add_sim(sub: Any) -> None:
    from cluster.tools.sim.command import add_sim_parser

    add_sim_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
