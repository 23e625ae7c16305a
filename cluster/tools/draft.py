"""``splitserve draft``: build a self-draft (a target's first N layers) for speculative decoding.

    splitserve draft --from MODEL [--layers N] --out DIR [--force]
                     [--measure] [--measure-k K] [--measure-tokens T] [--threads N]

MODEL is a Hugging Face directory or a .gguf file; DIR becomes an ordinary checkpoint
directory (engine/models/self_draft.py: first N layers, final norm, head, tokenizer files),
written atomically. ``--layers`` defaults to 80 % of the target's layers (24 of 30 for
SmolLM2-135M; engine/models/self_draft.py ``default_draft_layers`` says why).

``--measure`` then runs greedy speculative decoding offline (engine/spec/offline.py) with the
new draft proposing K tokens per step for the full target, one prompt at a time, on a few
built-in chat prompts rendered with the model's chat template, and prints the acceptance
rate (accepted / proposed draft tokens), the acceptance at each draft position, the tokens
emitted per target forward, the wall-time ratio against plain decoding on the same path, and
how many tokens agree with plain greedy decoding. ``--threads`` (default 1, as a Ray worker
with num_cpus=1 runs) keeps the timing comparable on a shared machine: two intra-op threads
on an oversubscribed 2-core box stall small parallel ops (SDPA of a few rows: 0.014 ms with
one thread, 8 ms with two, at load 8).

Only argparse is imported at module level (the CLI stays fast for the other subcommands).
Exit status: 0; 2 for a bad argument, a missing model, an existing DIR or a model the engine
cannot run (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cluster.argtypes import positive_int

# Chat questions for --measure (the same as the real-model tests' prompts).
MEASURE_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Explain in one sentence what a CPU does.",
    "Give me a synonym for happy.",
)


def add_draft_parser(sub: Any) -> None:
    p = sub.add_parser(
        "draft",
        help="build a self-draft model (a target's first N layers) for speculative decoding",
        description="Write the first N decoder layers of MODEL, with its final norm, head and tokenizer, as a "
        "Hugging Face checkpoint directory usable as speculative_config's draft model.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="MODEL", help="target: HF directory or .gguf")
    p.add_argument("--layers", type=positive_int, metavar="N", help="layers kept (default: 80%% of the target's)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace DIR when it holds a self-draft")
    p.add_argument("--measure", action="store_true", help="measure greedy acceptance against the target afterwards")
    p.add_argument("--measure-k", type=positive_int, default=4, metavar="K", help="draft tokens per step (default: 4)")
    p.add_argument(
        "--measure-tokens", type=positive_int, default=64, metavar="T", help="tokens per prompt (default: 64)"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="torch threads for --measure (default: 1, what a Ray worker with num_cpus=1 gets)",
    )
    p.set_defaults(func=run_draft)


def run_draft(args: argparse.Namespace) -> int:
    from engine.config import UnsupportedModelError
    from engine.models.gguf import resolve_model_path
    from engine.models.self_draft import build_self_draft, default_draft_layers

    try:
        src = resolve_model_path(args.source)
        with open(os.path.join(src, "config.json")) as f:
            total = json.load(f).get("num_hidden_layers")
        layers = args.layers or default_draft_layers(int(total))
        out = build_self_draft(src, layers, args.out, progress=True, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError, UnsupportedModelError) as e:
        print(f"splitserve draft: {e}", file=sys.stderr)
        return 2
    print(f"self-draft with {layers} of {total} layers written to {out}")
    if args.measure:
        import torch

        torch.set_num_threads(args.threads)
        print(format_measurement(measure(src, out, args.measure_k, args.measure_tokens), layers, total))
    return 0


def chat_prompt_ids(model_dir: str) -> list[list[int]]:
    """MEASURE_PROMPTS as one user turn each in the model's chat template (plain text when it
    has none), token ids."""
    from cluster.frontends.chat_template import ChatTemplate
    from engine.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    template = ChatTemplate.from_model_dir(model_dir)
    if template is None:
        return [tok.encode(q) for q in MEASURE_PROMPTS]
    return [
        tok.encode(template.render([{"role": "user", "content": q}]), add_special_tokens=False) for q in MEASURE_PROMPTS
    ]


def measure(target_dir: str, draft_dir: str, k: int, max_tokens: int):  # -> DraftMeasurement
    from engine.config import ModelConfig
    from engine.spec.draft import DraftProposer
    from engine.spec.offline import blocks_for, measure_draft
    from engine.spec.paged_model import PagedModel

    prompts = chat_prompt_ids(target_dir)
    cfg = ModelConfig.from_hf_dir(target_dir)
    block_size = 16
    blocks = max(blocks_for([p], max_tokens, k, block_size) for p in prompts)
    max_len = max(len(p) for p in prompts) + max_tokens + k + 1
    target = PagedModel.load(target_dir, max_len, blocks, block_size)
    draft = DraftProposer.load(draft_dir, cfg, max_len, blocks, block_size, target_path=target_dir)
    return measure_draft(target, draft, prompts, k, max_tokens, cfg.eos_token_ids)


def format_measurement(m: Any, layers: int, total: int) -> str:
    s = m.stats
    per_pos = " ".join(f"{a / p:.2f}" if p else "-" for a, p in zip(s.accepted_at, s.proposed_at, strict=True))
    return (
        f"greedy acceptance of the {layers}/{total}-layer draft, k={m.k}, {len(MEASURE_PROMPTS)} chat prompts:\n"
        f"  acceptance rate   {s.acceptance_rate:.3f} ({s.accepted}/{s.proposed} draft tokens)\n"
        f"  by position       {per_pos}\n"
        f"  tokens per step   {s.tokens_per_step:.2f} (target forwards: {s.target_steps})\n"
        f"  time vs plain     {s.seconds:.2f} s vs {m.plain_seconds:.2f} s (speedup {m.speedup:.2f}x, batch 1)\n"
        f"  same as plain     {m.identical_tokens}/{m.total_tokens} tokens before the first difference"
    )
