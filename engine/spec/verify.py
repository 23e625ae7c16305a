"""Verification of draft tokens against the target's logits: pure tensor functions.

Layout of one verification step over B requests with ragged draft lengths k_i >= 0:

    logits: [sum_i (k_i + 1), V] fp32, request i's rows contiguous and in order. Row j of
        request i (0 <= j <= k_i) is the target's next-token distribution after the request's
        known tokens plus its first j draft tokens; row k_i is the "bonus" row.
    emitted tokens of request i: its first m_i drafts (accepted) and one more token from row
        m_i (a correction when draft m_i was rejected, the bonus when all k_i were accepted),
        so 1 <= len = m_i + 1 <= k_i + 1. With k_i = 0 this is ordinary sampling.

Greedy requests (temperature < GREEDY_TEMPERATURE, the sampler's threshold): draft j is
accepted while it equals the argmax of row j; every emitted token is the target's argmax, so
greedy output is the target's own greedy output (up to the numerics of scoring k + 1 rows).

Other requests: rejection sampling (Leviathan et al. 2023, Chen et al. 2023), which emits
tokens distributed exactly as sampling from the target one token at a time. With p_j the
target's sampling distribution of row j (temperature, top-k, top-p exactly as
engine/sampler.py) and q_j the distribution draft j was drawn from (one-hot when the
proposal was deterministic): accept draft x_j with probability min(1, p_j(x_j) / q_j(x_j));
at the first rejection emit a sample of norm(max(0, p_j - q_j)) and stop; when all k_i are
accepted emit a sample of p_{k_i}.

Seeding (consistent with engine/sampler.py): the random numbers for the token at output
index t (``VerifyInput.token_index + j`` for row j) come from one generator seeded with
``(seed * 1_000_003 + t) & (2**63 - 1)`` (``seed_for``), as the sampler seeds the draw of
output token t. Row j first draws the acceptance uniform, then (if rejected) the correction
from the same generator; the bonus row's generator draws ``multinomial(p, 1)``, which is
exactly the sampler's draw: with k_i = 0 verification reproduces the sampler token for token.
A seeded request is reproducible for a given sequence of k's; another sequence of k (the
policy adapts k to load) gives another, equally distributed, output. Unseeded requests draw
from torch's global generator, batched. Draft models sample their proposals from a separate
stream (``DRAFT_STREAM``) so q's draws are independent of the acceptance uniforms.

Logprobs of emitted tokens are the target's: log_softmax of row j's raw logits (as the
sampler reports them), with the top-n of that row when the request asks for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.request import SamplingParams, TokenLogprobs
from engine.sampler import token_seed

GREEDY_TEMPERATURE = 1e-5  # engine/sampler.py's _MIN_TEMPERATURE: below it a request is greedy
TARGET_STREAM = 0  # the sampler's stream: seed_for(seed, t) is exactly its generator seed
DRAFT_STREAM = 1  # draft-model proposals
_SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF
_STREAM_SALT = 0x9E37_79B9_7F4A_7C15  # odd 64-bit constant: streams map seeds apart


def seed_for(seed: int, token_index: int, stream: int = TARGET_STREAM) -> int:
    """The generator seed of output token ``token_index`` of a request seeded ``seed``."""
    if stream == TARGET_STREAM:
        return token_seed(seed, token_index)
    return ((seed * 1_000_003 + token_index) ^ (stream * _STREAM_SALT)) & _SEED_MASK


def token_generator(
    params: SamplingParams, token_index: int, device: torch.device | str, stream: int = TARGET_STREAM
) -> torch.Generator | None:
    """A generator for one output token of a seeded request; None (global RNG) when unseeded."""
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed_for(params.seed, token_index, stream))
    return g


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] -> top-k / top-p truncated (the same operations as engine/sampler.py)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    return logits


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits: [N, V] fp32 -> [N, V] the distribution each row is sampled from.

    Greedy rows: one-hot at the argmax. Others: softmax(truncate(logits / temperature)),
    computed row by row with the sampler's operations so seeded draws match it bit for bit.
    """
    out = torch.zeros_like(logits)
    plain = [i for i, p in enumerate(params) if not is_greedy(p) and p.top_k <= 0 and p.top_p >= 1.0]
    if plain:  # temperature only: one batched softmax (row for row the same values as the sampler's)
        temps = torch.tensor([params[i].temperature for i in plain], dtype=logits.dtype, device=logits.device)
        out[plain] = torch.softmax(logits[plain] / temps[:, None], dim=-1)
    done = set(plain)
    for i, p in enumerate(params):
        if i in done:
            continue
        if is_greedy(p):
            out[i, int(logits[i].argmax())] = 1.0
        else:
            out[i] = torch.softmax(_truncate(logits[i] / p.temperature, p.top_k, p.top_p), dim=-1)
    return out


@dataclass(frozen=True)
class VerifyInput:
    """One request of a verification step.

    draft_token_ids: its k >= 0 draft tokens (the step scored k + 1 rows for it).
    token_index: output index of the first token this step emits (= output tokens so far).
    draft_probs: [k, V] rows the drafts were sampled from, or None (deterministic drafts).
    """

    draft_token_ids: Sequence[int]
    params: SamplingParams
    token_index: int
    draft_probs: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return len(self.draft_token_ids) + 1


@dataclass(frozen=True)
class VerifyOutput:
    """token_ids: accepted drafts then one correction/bonus token (len = num_accepted + 1).
    logprobs: one per emitted token (target's raw distribution), None unless asked for."""

    token_ids: list[int]
    num_accepted: int
    logprobs: list[TokenLogprobs] | None = None


def row_starts(num_rows: Sequence[int]) -> list[int]:
    """First logits row of each request: [0, n_0, n_0 + n_1, ...] (len B)."""
    starts, acc = [], 0
    for n in num_rows:
        starts.append(acc)
        acc += n
    return starts


def verify_greedy(logits: torch.Tensor, drafts: Sequence[Sequence[int]]) -> list[list[int]]:
    """logits: [sum(k_i + 1), V] -> emitted tokens per request (argmax-consistent)."""
    if logits.shape[0] != sum(len(d) + 1 for d in drafts):
        raise ValueError(f"logits has {logits.shape[0]} rows, drafts need {sum(len(d) + 1 for d in drafts)}")
    argmax = logits.argmax(dim=-1)  # [N]
    b, kmax = len(drafts), max((len(d) for d in drafts), default=0)
    if kmax == 0:
        return [[t] for t in argmax.tolist()]
    starts = torch.tensor(row_starts([len(d) + 1 for d in drafts]))
    lens = torch.tensor([len(d) for d in drafts])
    j = torch.arange(kmax)
    valid = j[None, :] < lens[:, None]  # [B, Kmax]
    rows = (starts[:, None] + j[None, :]).clamp(max=logits.shape[0] - 1)
    padded = torch.full((b, kmax), -1, dtype=torch.long)
    padded[valid] = torch.tensor([t for d in drafts for t in d], dtype=torch.long)
    match = (argmax[rows] == padded) & valid
    accepted = match.long().cumprod(dim=1).sum(dim=1)  # [B] leading matches
    emitted_rows = argmax.tolist()
    s, a = starts.tolist(), accepted.tolist()
    return [emitted_rows[s[i] : s[i] + a[i] + 1] for i in range(b)]


def verify_rejection(logits: torch.Tensor, inputs: Sequence[VerifyInput]) -> list[list[int]]:
    """logits: [sum(k_i + 1), V] -> emitted tokens per request, by rejection sampling.

    Every request must be non-greedy. Vectorised over rows for the probabilities and the
    acceptance test; one small draw per seeded token (its own generator) and one batched
    draw for the corrections/bonuses of unseeded requests.
    """
    n_rows = [inp.num_rows for inp in inputs]
    if logits.shape[0] != sum(n_rows):
        raise ValueError(f"logits has {logits.shape[0]} rows, inputs need {sum(n_rows)}")
    dev = logits.device
    row_params = [inp.params for inp, n in zip(inputs, n_rows, strict=True) for _ in range(n)]
    p = sampling_probs(logits, row_params)  # [N, V]
    starts = row_starts(n_rows)
    # acceptance test of every draft row: u * q(x) < p(x)  <=>  u < min(1, p(x) / q(x))
    draft_rows = [s + j for s, inp in zip(starts, inputs, strict=True) for j in range(len(inp.draft_token_ids))]
    x = torch.tensor([t for inp in inputs for t in inp.draft_token_ids], dtype=torch.long, device=dev)
    gens: dict[int, torch.Generator | None] = {}  # draft row -> its token's generator (seeded only)
    u = torch.empty(len(draft_rows), device=dev)
    unseeded = []
    pos = 0
    for s, inp in zip(starts, inputs, strict=True):
        for j in range(len(inp.draft_token_ids)):
            g = token_generator(inp.params, inp.token_index + j, dev)
            if g is None:
                unseeded.append(pos)
            else:
                gens[s + j] = g
                u[pos] = torch.rand(1, generator=g, device=dev)[0]
            pos += 1
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=dev)
    accept_row = torch.zeros(0, dtype=torch.bool, device=dev)
    if draft_rows:
        dr = torch.tensor(draft_rows, dtype=torch.long, device=dev)
        p_x = p[dr, x]
        q_x = torch.ones_like(p_x)
        qpos = 0
        for inp in inputs:
            k = len(inp.draft_token_ids)
            if inp.draft_probs is not None:
                idx = torch.arange(qpos, qpos + k, device=dev)
                q_x[idx] = inp.draft_probs.to(dev, torch.float32)[torch.arange(k, device=dev), x[idx]]
            qpos += k
        accept_row = u * q_x < p_x
    accept = accept_row.tolist()
    # per request: leading accepts, then the row whose token is sampled
    out_tokens: list[list[int]] = []
    final: list[tuple[int, int, int]] = []  # (request, row, accepted)
    pos = 0
    for i, (s, inp) in enumerate(zip(starts, inputs, strict=True)):
        k = len(inp.draft_token_ids)
        m = 0
        while m < k and accept[pos + m]:
            m += 1
        pos += k
        out_tokens.append(list(inp.draft_token_ids[:m]))
        final.append((i, s + m, m))
    # distribution of the final token: the bonus row's p, or the residual of the rejected row
    dists = []
    for i, row, m in final:
        inp = inputs[i]
        if m == len(inp.draft_token_ids):
            dists.append(p[row])
            continue
        if inp.draft_probs is not None:
            q = inp.draft_probs[m].to(dev, torch.float32)
            resid = (p[row] - q).clamp_(min=0.0)
        else:
            resid = p[row].clone()
            resid[int(inp.draft_token_ids[m])] = 0.0
        total = resid.sum()
        # total == 0 only when p == q, where a rejection has probability 0: sample p then
        dists.append(resid / total if total > 0 else p[row])
    batch = [n for n, (i, row, m) in enumerate(final) if inputs[i].params.seed is None]
    if batch:
        drawn = torch.multinomial(torch.stack([dists[n] for n in batch]), 1).view(-1).tolist()
        for n, tok in zip(batch, drawn, strict=True):
            out_tokens[final[n][0]].append(tok)
    for n, (i, row, m) in enumerate(final):
        inp = inputs[i]
        if inp.params.seed is None:
            continue
        # a rejected row reuses the generator that drew its uniform; the bonus row gets its own
        g = gens[row] if row in gens else token_generator(inp.params, inp.token_index + m, dev)
        out_tokens[i].append(int(torch.multinomial(dists[n], 1, generator=g).item()))
    return out_tokens


def target_logprobs(
    logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int], top_n: int
) -> list[TokenLogprobs]:
    """Logprobs of ``tokens[j]`` under the raw distribution of ``logits[rows[j]]``, with top-n."""
    logp = torch.log_softmax(logits[list(rows)], dim=-1)
    out = []
    for j, tok in enumerate(tokens):
        top = torch.topk(logp[j], top_n) if top_n else None
        out.append(
            TokenLogprobs(
                token_id=int(tok),
                logprob=float(logp[j, tok]),
                top={} if top is None else dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
            )
        )
    return out


def verify(logits: torch.Tensor, inputs: Sequence[VerifyInput]) -> list[VerifyOutput]:
    """One verification step (module docstring): greedy requests by argmax, others by
    rejection sampling; logprobs for the requests that ask for them."""
    n_rows = [inp.num_rows for inp in inputs]
    if logits.dim() != 2 or logits.shape[0] != sum(n_rows):
        raise ValueError(f"logits must be [{sum(n_rows)}, V], got {tuple(logits.shape)}")
    for n, inp in enumerate(inputs):
        q = inp.draft_probs
        if q is not None and tuple(q.shape) != (len(inp.draft_token_ids), logits.shape[1]):
            raise ValueError(
                f"input {n}: draft_probs must be [{len(inp.draft_token_ids)}, {logits.shape[1]}], got {tuple(q.shape)}"
            )
    starts = row_starts(n_rows)
    greedy = [i for i, inp in enumerate(inputs) if is_greedy(inp.params)]
    sampled = [i for i, inp in enumerate(inputs) if not is_greedy(inp.params)]
    tokens: list[list[int]] = [[] for _ in inputs]

    def gather(idx: list[int]) -> torch.Tensor:
        rows = [r for i in idx for r in range(starts[i], starts[i] + n_rows[i])]
        return logits if len(idx) == len(inputs) else logits[rows]

    if greedy:
        for i, toks in zip(
            greedy, verify_greedy(gather(greedy), [inputs[i].draft_token_ids for i in greedy]), strict=True
        ):
            tokens[i] = toks
    if sampled:
        for i, toks in zip(sampled, verify_rejection(gather(sampled), [inputs[i] for i in sampled]), strict=True):
            tokens[i] = toks
    out = []
    for i, inp in enumerate(inputs):
        toks = tokens[i]
        lps = None
        if inp.params.logprobs is not None:
            lps = target_logprobs(logits, range(starts[i], starts[i] + len(toks)), toks, inp.params.logprobs)
        out.append(VerifyOutput(token_ids=toks, num_accepted=len(toks) - 1, logprobs=lps))
    return out
