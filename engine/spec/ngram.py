"""Prompt-lookup n-gram proposer (vLLM's ``NgramProposer`` algorithm).

For a request with tokens t[0..L): find the longest n in [min_n, max_n] such that the last
n tokens t[L-n..L) also occur earlier, ending at some j <= L-2; among the occurrences of that
longest n take the earliest (smallest j, as vLLM v1 does); propose the up to k tokens that
followed it, t[j+1 .. j+1+k) (fewer when the context ends first; they may run into the
suffix itself, as in vLLM). No occurrence of any n >= min_n: an empty proposal.

One pass per request finds every n at once: for each candidate end position j, the match
length ``len[j] = max m <= max_n with t[j-i] == t[L-1-i] for all i < m`` is built with max_n
vectorised comparisons over the whole context (numpy, O(max_n * L), ~10 us for L = 2k),
so n-gram lookup does not dominate a step. Deterministic: the same tokens give the same
proposal. The proposals are chosen, not sampled: ``Proposal.probs`` is None (q one-hot).

State: a per-request numpy copy of the tokens, extended by the new tail each call (a
request's token list only grows); ``release`` drops it. ``on_accepted`` has nothing to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine.spec.proposer import EMPTY_PROPOSAL, Proposal, ProposalInput


def find_ngram_proposal(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """tokens: [L] int64 -> up to k proposed tokens (empty when no n-gram >= min_n recurs)."""
    n_tok = tokens.shape[0]
    if k <= 0 or n_tok < min_n + 1:
        return tokens[:0]
    cand = tokens[:-1]  # candidate end positions j in [0, L-2]
    run = cand == tokens[-1]  # run[j]: t[j-i] == t[L-1-i] for every i <= m so far
    lengths = run.astype(np.int32)
    for i in range(1, min(max_n, n_tok - 1)):
        if not run.any():
            break
        nxt = np.zeros_like(run)
        nxt[i:] = run[i:] & (cand[: n_tok - 1 - i] == tokens[n_tok - 1 - i])
        run = nxt
        lengths += run
    best = int(lengths.max())
    if best < min_n:
        return tokens[:0]
    j = int(np.argmax(lengths == best))  # the earliest occurrence of the longest match
    return tokens[j + 1 : j + 1 + k]


class NgramProposer:
    """Prompt lookup over prompt + output; stateless apart from a per-request token copy."""

    name = "ngram"

    def __init__(self, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._tokens: dict[str, tuple[np.ndarray, int]] = {}  # id -> (buffer, valid length)

    def _array(self, inp: ProposalInput) -> np.ndarray:
        ids = inp.token_ids
        buf, n = self._tokens.get(inp.request_id, (None, 0))
        if buf is None or len(ids) < n or int(buf[n - 1]) != ids[n - 1]:
            buf, n = np.empty(max(64, 2 * len(ids)), dtype=np.int64), 0  # new, or not a continuation
        if len(ids) > buf.shape[0]:
            grown = np.empty(2 * len(ids), dtype=np.int64)
            grown[:n] = buf[:n]
            buf = grown
        if len(ids) > n:
            buf[n : len(ids)] = ids[n:]
        self._tokens[inp.request_id] = (buf, len(ids))
        return buf[: len(ids)]

    def propose(self, requests: Sequence[ProposalInput], k: Mapping[str, int]) -> dict[str, Proposal]:
        out: dict[str, Proposal] = {}
        for inp in requests:
            want = k.get(inp.request_id, 0)
            if want <= 0:
                out[inp.request_id] = EMPTY_PROPOSAL
                continue
            found = find_ngram_proposal(self._array(inp), self.min_n, self.max_n, want)
            out[inp.request_id] = Proposal(found.tolist()) if found.size else EMPTY_PROPOSAL
        return out

    def on_accepted(self, request_id: str, num_accepted: int) -> None:
        pass  # the next input carries the accepted tokens; nothing is speculative here

    def release(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)
