"""A per-token-id routing prior, fitted on a routing log: what the router can predict about a
request's experts before any forward of it ran.

With layer-wise KV push the decode rank is chosen before the prefill, and the router cannot
run the model, so s-TS request placement (expert_router/sts.py) votes with a prediction from
the prompt's token ids alone: for every token id the calibration log saw, its most frequent
top-k experts per MoE layer; an id the log never saw gets the log's most popular top-k of
that layer. The prediction only moves requests between EP ranks: a wrong one costs traffic
(its tokens take the normal all-to-all path), never a different output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from expert_router.routing_log import RoutingLog


@dataclass(frozen=True)
class TokenPrior:
    layers: tuple[int, ...]  # the MoE layer indices (the log's), ascending
    num_experts: int  # E, routed experts per MoE layer
    top_k: int  # k
    vocab: np.ndarray  # [V] int64, the token ids the log saw, ascending
    table: np.ndarray  # [V, L, k] int64, token vocab[v]'s k most frequent experts at layers[l]
    fallback: np.ndarray  # [L, k] int64, the log's k most popular experts per layer (unseen ids)

    def __post_init__(self) -> None:
        nl, k = len(self.layers), self.top_k
        if self.table.shape != (len(self.vocab), nl, k) or self.fallback.shape != (nl, k):
            raise ValueError(
                f"TokenPrior: table {self.table.shape} / fallback {self.fallback.shape} do not fit "
                f"{len(self.vocab)} ids, {nl} layers, top-{k}"
            )

    @classmethod
    def fit(cls, log: RoutingLog) -> TokenPrior:
        """The prior of ``log``; raises ValueError when the log has no ``token_ids`` (recorded
        before they were logged: record it again with ``splitserve route-log``). Ties between
        equally frequent experts go to the lower expert id."""
        if log.token_ids is None:
            raise ValueError(
                f"routing log of {log.model!r} has no token_ids: record it again with splitserve route-log"
            )
        vocab, inverse = np.unique(log.token_ids.astype(np.int64), return_inverse=True)
        nl, k, e = len(log.layers), log.top_k, log.num_experts
        table = np.zeros((len(vocab), nl, k), np.int64)
        fallback = np.zeros((nl, k), np.int64)
        for li in range(nl):
            counts = np.zeros((len(vocab), e), np.int64)  # [V, E] choices per (token id, expert)
            ids = log.ids[:, li].astype(np.int64)  # [N, k]
            for j in range(k):
                np.add.at(counts, (inverse, ids[:, j]), 1)
            table[:, li] = np.argsort(-counts, axis=1, kind="stable")[:, :k]
            fallback[li] = np.argsort(-counts.sum(axis=0), kind="stable")[:k]
        return cls(tuple(log.layers), e, k, vocab, table, fallback)

    def predict(self, token_ids: Sequence[int]) -> np.ndarray:
        """[n, L, k] the predicted top-k experts of each of ``token_ids`` at every MoE layer."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self.vocab, ids), max(len(self.vocab) - 1, 0))
        seen = (self.vocab[pos] == ids) if len(self.vocab) else np.zeros(len(ids), bool)
        out = np.broadcast_to(self.fallback, (len(ids), *self.fallback.shape)).copy()
        out[seen] = self.table[pos[seen]]
        return out
