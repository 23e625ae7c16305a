"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, top-n logprobs.

Greedy rows take the argmax of the raw logits. Other rows are scaled by 1/temperature,
truncated to top-k then top-p, and drawn with a generator seeded from (seed, token index)
when the request has a seed, so its output does not depend on what it was batched with.
Logprobs are those of the raw model distribution (log_softmax of unprocessed logits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.request import SamplingParams, TokenLogprobs

_MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] -> logits with everything outside top-k / top-p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
        drop[0] = False  # the most likely token always survives (top_p may round to 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    return logits


def token_seed(seed: int, token_index: int) -> int:
    """The generator seed of output token ``token_index`` of a request seeded ``seed`` (the
    speculative verifier, engine/spec/verify.py, draws the same token from the same seed)."""
    return (seed * 1_000_003 + token_index) & 0x7FFF_FFFF_FFFF_FFFF


def _generator(params: SamplingParams, token_index: int, device) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(token_seed(params.seed, token_index))
    return g


def plain_greedy(params: list[SamplingParams]) -> bool:
    """True when every row is greedy without logprobs: the argmax of each row is the answer."""
    return all(p.temperature < _MIN_TEMPERATURE and p.logprobs is None for p in params)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    token_indices: list[int],
    agree: Callable[[list[int]], list[int]] | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [N, V] fp32 -> (one token per row, logprobs per row or None).

    ``agree`` (tensor parallelism: every rank samples from the same logits): when a row was
    drawn from the process's global generator (temperature > 0, no seed), the tokens go
    through ``agree`` (rank 0's, on every rank) before the logprobs are taken. Greedy and
    seeded rows are the same on every rank without it; whether it is called depends only on
    ``params``, which every rank has the same."""
    tokens = logits.argmax(dim=-1).tolist()
    if plain_greedy(params):
        return tokens, [None] * len(params)
    unseeded = False
    for i, p in enumerate(params):
        if p.temperature < _MIN_TEMPERATURE:  # greedy; tiny temperatures would overflow to NaN
            continue
        row = _truncate(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = _generator(p, token_indices[i], logits.device)
        unseeded |= gen is None
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    if unseeded and agree is not None:
        tokens = agree(tokens)
    lps: list[TokenLogprobs | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            n = params[i].logprobs
            top = torch.topk(logp[j], n) if n else None
            lps[i] = TokenLogprobs(
                token_id=tokens[i],
                logprob=float(logp[j, tokens[i]]),
                top={} if top is None else dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
            )
    return tokens, lps
