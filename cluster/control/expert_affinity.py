"""s-TS request placement in the router: which member of an expert-parallel pool a request
goes to, predicted from its prompt's token ids (expert_router/sts.py, token_prior.py).

The router cannot run the model, and with layer-wise KV push the decode rank is chosen
before the prefill, so the prediction is the routing log's per-token-id prior: every prompt
token votes, at every MoE layer, for the ranks that hold its predicted top-k experts under
the pool's placement; the most voted member wins unless it already holds at least
``max_imbalance`` times its fair share of the requests in flight among the candidates (then
the most voted below the cap; the cap of sts.py's offline measurement). Placement only
changes where a request runs, never its output (mispredicted tokens take the all-to-all).

One ``ExpertAffinity`` per EP pool with an ``expert_routing_log``; it answers only when every
candidate the routing policy offers is a member of its pool (worker ``<pool>-<i>`` is EP rank
i), otherwise the usual policy decides. Without a routing log there is no ExpertAffinity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cluster.config import ConfigError, ServeConfig
from cluster.control.routing import WorkerLoad
from expert_router.placement import ExpertPlacement
from expert_router.sts import capped_rank, rank_votes
from expert_router.token_prior import TokenPrior


class ExpertAffinity:
    """The s-TS placement of one EP pool (a routing policy ``DecodeAffinity``). Pure: no I/O."""

    def __init__(self, pool: str, placement: ExpertPlacement, prior: TokenPrior, max_imbalance: float = 1.5) -> None:
        if tuple(placement.layers) != tuple(prior.layers):
            raise ValueError(f"pool {pool!r}: placement layers {placement.layers} != routing log's {prior.layers}")
        self.pool = pool
        self.placement = placement
        self.prior = prior
        self.max_imbalance = max_imbalance
        self.placed = 0  # requests this affinity chose the worker for
        self.capped = 0  # of those, requests that went elsewhere than the most voted (load cap)

    def rank_of(self, worker_id: str) -> int | None:
        """The EP rank of ``worker_id`` if it is a member of this pool."""
        head, _, index = worker_id.rpartition("-")
        if head != self.pool or not index.isdigit() or int(index) >= self.placement.world_size:
            return None
        return int(index)

    def votes(self, prompt_token_ids: Sequence[int]) -> np.ndarray:
        """[W] the prompt's predicted (token, layer, choice) count per EP rank."""
        return rank_votes(self.placement, self.prior.layers, self.prior.predict(prompt_token_ids))

    def choose(self, cands: Sequence[WorkerLoad], prompt_token_ids: Sequence[int]) -> WorkerLoad | None:
        """The member for a request with this prompt among ``cands`` (healthy, accepting), or
        None when some candidate is not a member or the prompt is empty (the usual policy)."""
        ranks = [self.rank_of(w.worker_id) for w in cands]
        if not cands or not len(prompt_token_ids) or any(r is None for r in ranks):
            return None
        order = sorted(range(len(cands)), key=lambda i: ranks[i])  # candidates by rank
        all_votes = self.votes(prompt_token_ids)
        votes = np.array([all_votes[ranks[i]] for i in order])
        counts = np.array([cands[i].pending_requests for i in order], dtype=np.float64)
        pick = capped_rank(votes, counts, self.max_imbalance)
        self.placed += 1
        self.capped += int(votes[pick] < votes.max())
        return cands[order[pick]]


def build_expert_affinities(config: ServeConfig) -> list[ExpertAffinity]:
    """One ExpertAffinity per EP pool with an ``expert_routing_log``, checked against the model
    (``config.model`` a model directory). Raises ConfigError naming the pool's field."""
    from engine.config import ModelConfig
    from expert_router.group import EPSetupError, serving_placement, serving_token_prior

    out: list[ExpertAffinity] = []
    model: ModelConfig | None = None
    for i, pool in enumerate(config.pools):
        if pool.expert_routing_log is None:
            continue
        model = model or ModelConfig.from_hf_dir(config.model)
        try:
            placement_json = None
            if pool.expert_placement is not None:
                with open(pool.expert_placement, encoding="utf-8") as f:
                    placement_json = f.read()
            placement, _ = serving_placement(model, pool.experts, placement_json, pool.expert_cache_slots)
            prior = serving_token_prior(model, pool.expert_routing_log)
        except EPSetupError as e:
            raise ConfigError(f"pools[{i}].{e.field}", str(e).split(": ", 1)[1]) from None
        out.append(ExpertAffinity(pool.name, placement, prior))
    return out
