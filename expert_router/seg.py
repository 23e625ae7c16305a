"""s-EG (Speculative MoE's expert grouping): place co-activated experts on the same rank.

A token whose top-k experts sit on d distinct ranks is sent d times (d - 1 or d of them
across links) and combined from d ranks, so all-to-all bytes grow with d. s-EG fits, per MoE
layer, a balanced placement (the ranks' expert counts differ by at most one, as in the
contiguous placement) that maximises the co-activation kept inside a rank:

    C[i, j] = tokens of the routing log whose top-k holds both i and j (i != j)
    maximise  sum over ranks of sum_{i < j on that rank} C[i, j]

For top-2 this is exactly minimising the mean distinct ranks per token (d = 2 - [both on one
rank]); for k > 2 it is the pairwise proxy. Solved greedily then refined by pairwise swaps
(Kernighan-Lin style: the best improving swap of two experts on different ranks, until none
improves), deterministic for a given log. Expert popularity is not balanced across ranks here
(EPLB's concern); ``placement_traffic`` reports the per-rank load so the cost is visible.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from expert_router.placement import ExpertPlacement
from expert_router.routing_log import RoutingLog


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids: [N, k] top-k ids of one layer -> C [E, E] float64, zero diagonal."""
    n, k = ids.shape
    c = np.zeros((num_experts, num_experts), dtype=np.float64)
    for a in range(k):
        for b in range(k):
            if a != b:
                np.add.at(c, (ids[:, a].astype(np.int64), ids[:, b].astype(np.int64)), 1.0)
    return c


def group_sizes(num_experts: int, world_size: int) -> list[int]:
    """Experts per rank, larger first (the contiguous placement's sizes)."""
    base, extra = divmod(num_experts, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def balanced_clusters(c: np.ndarray, world_size: int) -> list[int]:
    """A balanced partition of the experts maximising intra-rank co-activation -> owner rank
    per expert. c: [E, E] symmetric, zero diagonal."""
    e = c.shape[0]
    sizes = group_sizes(e, world_size)
    load = c.sum(axis=1)
    owner = [-1] * e
    # greedy: each rank in turn is seeded with the busiest unplaced expert, then grows by the
    # unplaced expert with the most co-activation with its members (ties: lower id)
    for r, size in enumerate(sizes):
        free = [x for x in range(e) if owner[x] < 0]
        seed = max(free, key=lambda x: (load[x], -x))
        owner[seed] = r
        members = [seed]
        while len(members) < size:
            free = [x for x in range(e) if owner[x] < 0]
            best = max(free, key=lambda x: (c[x, members].sum(), load[x], -x))
            owner[best] = r
            members.append(best)
    # refine: best improving swap between ranks until none improves
    own = np.array(owner)
    while True:
        # gain of moving x to rank r: affinity to r's members minus affinity to its own
        aff = np.stack([c[:, own == r].sum(axis=1) for r in range(world_size)], axis=1)  # [E, W]
        best_gain, best_pair = 1e-9, None
        for x in range(e):
            for y in range(x + 1, e):
                rx, ry = own[x], own[y]
                if rx == ry:
                    continue
                gain = aff[x, ry] - aff[x, rx] + aff[y, rx] - aff[y, ry] - 2 * c[x, y]
                if gain > best_gain:
                    best_gain, best_pair = gain, (x, y)
        if best_pair is None:
            return own.tolist()
        x, y = best_pair
        own[x], own[y] = own[y], own[x]


def coactivation_placement(log: RoutingLog, world_size: int, align_layers: bool = True) -> ExpertPlacement:
    """s-EG: one balanced co-activation clustering per MoE layer of ``log``.

    ``align_layers``: the clusters of each layer are given the rank labels (a permutation)
    under which tokens most often find their next layer's experts on the rank that held
    their previous layer's, so a request placed on one rank (s-TS, expert_router/sts.py)
    stays local across layers. Labels change no layer's distinct-ranks count."""
    owners: dict[int, tuple[int, ...]] = {}
    prev: np.ndarray | None = None
    for li, layer in enumerate(log.layers):
        ids = log.ids[:, li].astype(np.int64)
        own = np.array(balanced_clusters(coactivation(ids, log.num_experts), world_size))
        if align_layers and prev is not None:
            before = prev[log.ids[:, li - 1].astype(np.int64)]  # [N, k] ranks at the previous layer
            after = own[ids]  # [N, k] cluster labels here
            m = np.zeros((world_size, world_size))
            for a in range(before.shape[1]):
                for b in range(after.shape[1]):
                    np.add.at(m, (before[:, a], after[:, b]), 1.0)
            own = np.array(_best_relabel(m))[own]
        owners[layer] = tuple(int(r) for r in own)
        prev = own
    return ExpertPlacement(world_size, owners)


def _best_relabel(m: np.ndarray) -> list[int]:
    """m[r, c]: co-occurrences of rank r before and cluster c now -> label of each cluster
    maximising sum_c m[label[c], c] (exhaustive up to 7 ranks, greedy beyond)."""
    w = m.shape[0]
    if w <= 7:
        best = max(itertools.permutations(range(w)), key=lambda p: sum(m[p[c], c] for c in range(w)))
        return list(best)
    label, used = [-1] * w, set()
    for r, c in sorted(((r, c) for r in range(w) for c in range(w)), key=lambda rc: -m[rc]):
        if label[c] < 0 and r not in used:
            label[c] = r
            used.add(r)
    return label


@dataclass(frozen=True)
class Traffic:
    """What a placement costs on a routing log (all layers), with sequence s's tokens on
    source rank s % W (data-parallel attention's request placement, round robin)."""

    distinct_ranks_per_token: float  # mean over (token, layer) of ranks its top-k sit on
    remote_pairs_per_token: float  # mean (token, layer) rows sent to another rank
    bytes_per_token: float  # dispatch + combine bytes crossing ranks, per token (all layers)
    max_rank_load: float  # the busiest rank's share of expert invocations (1/W = balanced)


def placement_traffic(log: RoutingLog, placement: ExpertPlacement, hidden: int, dtype_bytes: int = 2) -> Traffic:
    """Traffic of ``placement`` on ``log``. Bytes per remote row: dispatch (H + k) values +
    k int32 ids, combine H values (expert_router/dispatcher.py's wire format)."""
    w, k = placement.world_size, log.top_k
    n = log.num_tokens
    src = np.zeros(n, dtype=np.int64)
    for s in range(log.num_sequences):
        src[log.seq_offsets[s] : log.seq_offsets[s + 1]] = s % w
    distinct = remote = 0.0
    loads = np.zeros(w)
    for li, layer in enumerate(log.layers):
        ranks = np.array(placement.owners[layer])[log.ids[:, li].astype(np.int64)]  # [N, k]
        goes = np.zeros((n, w), dtype=bool)
        goes[np.arange(n)[:, None], ranks] = True
        distinct += goes.sum()
        goes[np.arange(n), src] = False
        remote += goes.sum()
        loads += np.bincount(ranks.reshape(-1), minlength=w)
    row_bytes = (hidden + k) * dtype_bytes + k * 4 + hidden * dtype_bytes
    tokens = max(n, 1)
    return Traffic(
        distinct_ranks_per_token=distinct / (tokens * len(log.layers)),
        remote_pairs_per_token=remote / (tokens * len(log.layers)),
        bytes_per_token=remote * row_bytes / tokens,
        max_rank_load=float(loads.max() / max(loads.sum(), 1)),
    )
