"""``splitserve route-log``: record the experts a MoE model routes a calibration set to.

    splitserve route-log --model M --prompts FILE --out LOG [--max-tokens N] [--threads N]

M is a Hugging Face directory (or .gguf) of a Mixtral, Qwen2-MoE or Qwen3-MoE model; FILE
holds one prompt per line (plain text, tokenized with the model's tokenizer; empty lines are
skipped); LOG is the routing log written (``.npz``, format in expert_router/routing_log.py),
from which s-EG placement and the ExpertFlow predictor are fitted; it records each token's id
too, for the router's s-TS prior (pool ``expert_routing_log``, ``serve --expert-routing-log``).
Each prompt runs alone, greedy, with ``--max-tokens`` new tokens (default 16), so generated
tokens are logged too.

Exit status: 0; 2 for a missing file, a model that is not MoE, or an unreadable prompt file
(one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cluster.argtypes import positive_int


def add_route_log_parser(sub: Any) -> None:
    p = sub.add_parser(
        "route-log",
        help="record a MoE model's per-layer top-k expert choices on a calibration set",
        description="Run every prompt of FILE through MODEL and write the top-k experts each MoE layer chose "
        "for each token (the routing log s-EG placement and ExpertFlow prediction are fitted on).",
    )
    p.add_argument("--model", required=True, metavar="M", help="MoE model: HF directory or .gguf")
    p.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line")
    p.add_argument("--out", required=True, metavar="LOG", help="routing log to write (.npz)")
    p.add_argument("--max-tokens", type=positive_int, default=16, metavar="N", help="new tokens per prompt (16)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N", help="torch threads (default: 1)")
    p.set_defaults(func=run_route_log)


def run_route_log(args: argparse.Namespace) -> int:
    import torch

    from engine.config import UnsupportedModelError
    from engine.models.gguf import resolve_model_path
    from engine.tokenizer import Tokenizer
    from expert_router.routing_log import record_routing

    torch.set_num_threads(args.threads)
    try:
        path = resolve_model_path(args.model)
        with open(args.prompts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"{args.prompts}: no prompts (one per line)")
        tok = Tokenizer(path)
        log = record_routing(path, [tok.encode(t) for t in texts], max_tokens=args.max_tokens)
        log.save(args.out)
    except (FileNotFoundError, ValueError, UnsupportedModelError) as e:
        print(f"splitserve route-log: {e}", file=sys.stderr)
        return 2
    print(
        f"routing log of {log.num_sequences} sequences, {log.num_tokens} tokens, {len(log.layers)} MoE layers "
        f"(E={log.num_experts}, k={log.top_k}) written to {args.out}"
    )
    return 0
