"""s-TS (Speculative MoE's token pre-scheduling), in the form data-parallel attention allows:
placing each REQUEST on the EP rank that most likely hosts its tokens' experts.

Under data-parallel attention a token's KV cache lives on its request's rank, so a token
cannot move to another rank ahead of a layer for free (its attention needs that KV, and its
output must come back for the next layer anyway: a per-layer shuffle costs what the
dispatch it saves costs). What can move is the request, once, before its KV exists: the
router pre-schedules it onto the rank whose experts its routing path is predicted to use,
so that most of its (token, layer) choices stay on that rank and never cross a link.

Prediction: from the request's prompt routing (the prefill's own gate choices: in
disaggregated serving the prefill worker knows them before the decode rank is chosen), or,
without them, from the routing log's popularity. A mispredicted token simply takes the normal
all-to-all path: placement changes where a request runs, never what it computes (lossless).
``predict_rank`` is the policy; ``sts_traffic`` measures it on a routing log, predicting each
sequence's rank from its first ``prefix`` tokens and counting only the tokens after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expert_router.placement import ExpertPlacement
from expert_router.routing_log import RoutingLog


def rank_votes(placement: ExpertPlacement, layers: tuple[int, ...], ids: np.ndarray) -> np.ndarray:
    """ids: [n, L, k] routing of n tokens -> [W] how many (token, layer, choice) sit on each rank."""
    votes = np.zeros(placement.world_size)
    for li, layer in enumerate(layers):
        owners = np.array(placement.owners[layer])
        votes += np.bincount(owners[ids[:, li].astype(np.int64).reshape(-1)], minlength=placement.world_size)
    return votes


def predict_rank(
    placement: ExpertPlacement, layers: tuple[int, ...], prompt_ids: np.ndarray, load: np.ndarray | None = None
) -> int:
    """The rank for a request whose prompt routed ``prompt_ids`` [n, L, k]: the most voted;
    ``load`` [W] (requests per rank now) breaks ties toward the least loaded, then lower rank."""
    votes = rank_votes(placement, layers, prompt_ids)
    load = np.zeros(placement.world_size) if load is None else load
    return int(min(range(placement.world_size), key=lambda r: (-votes[r], load[r], r)))


def capped_rank(votes: np.ndarray, counts: np.ndarray, max_imbalance: float = 1.5) -> int:
    """The most voted index of ``votes`` [W] among those holding fewer than ``max_imbalance``
    times the fair share of ``counts`` [W] (requests per rank, the new one included); ties go
    to the fewer requests, then the lower index. All at the cap: the most voted of all."""
    w = len(votes)
    cap = max_imbalance * (counts.sum() + 1) / w
    allowed = [r for r in range(w) if counts[r] < cap] or list(range(w))
    return int(min(allowed, key=lambda r: (-votes[r], counts[r], r)))


@dataclass(frozen=True)
class STSResult:
    remote_pairs_per_token: float  # (token, layer) rows sent to another rank, per token
    bytes_per_token: float  # dispatch + combine bytes crossing ranks per token (all layers)
    local_fraction: float  # (token, layer) pairs whose experts all sit on the request's rank
    max_rank_requests: float  # the busiest rank's share of the requests (1/W = balanced)


def sts_traffic(
    log: RoutingLog,
    placement: ExpertPlacement,
    hidden: int,
    dtype_bytes: int = 2,
    prefix: int = 8,
    sts: bool = True,
    max_imbalance: float = 1.5,
) -> STSResult:
    """Traffic of the tokens after each sequence's first ``prefix`` (its "prompt"), with the
    sequence on the rank ``predict_rank`` picks from that prefix (``sts``) or round robin.
    ``max_imbalance``: a rank already holding that many times its fair share of requests is
    not picked (load still matters more than locality beyond it)."""
    w, k = placement.world_size, log.top_k
    counts = np.zeros(w)
    remote = local = pairs = tokens = 0
    for s, seq in enumerate(log.sequences()):
        if len(seq) <= prefix:
            continue
        if sts:
            home = capped_rank(rank_votes(placement, log.layers, seq[:prefix]), counts, max_imbalance)
        else:
            home = s % w
        counts[home] += 1
        rest = seq[prefix:].astype(np.int64)  # [n, L, k]
        n = rest.shape[0]
        tokens += n
        for li, layer in enumerate(log.layers):
            ranks = np.array(placement.owners[layer])[rest[:, li]]  # [n, k]
            goes = np.zeros((n, w), dtype=bool)
            goes[np.arange(n)[:, None], ranks] = True
            pairs += goes.sum()
            local += int((goes.sum(axis=1) == 1).__and__(goes[:, home]).sum())
            goes[:, home] = False
            remote += goes.sum()
    row_bytes = (hidden + k) * dtype_bytes + k * 4 + hidden * dtype_bytes
    t = max(tokens, 1)
    return STSResult(
        remote_pairs_per_token=remote / (t * len(log.layers)),
        bytes_per_token=remote * row_bytes / t,
        local_fraction=local / (t * len(log.layers)),
        max_rank_requests=float(counts.max() / max(counts.sum(), 1)),
    )
