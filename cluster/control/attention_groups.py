"""Attention groups: which attention workers hold which model worker's KV (attention offload).

With an attention pool of N workers and M decode-capable (decode or mixed) workers, N a
multiple of M (cluster/config.py refuses anything else, naming ``num_workers``), every
decode-capable worker is a model worker with K = N / M attention workers of its own:

    model worker i   the i-th decode-capable worker in config order (pools as listed,
                     ``<pool>-0`` first)
    its workers      ``<attention pool>-j`` for j in [i*K, (i+1)*K); the s-th of them is
                     shard s of its OffloadedEngine and rank s + 1 of its group
    its group        ``attn/<model worker id>`` = [model worker (rank 0), its K workers]

The plan is a function of the config alone (worker ids survive restarts), so a replaced group
keeps its members. Groups are independent: a member failing breaks only its own group, which
the controller replaces as one while the other model workers keep serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import ServeConfig

DECODE_CAPABLE = ("decode", "mixed")


@dataclass(frozen=True)
class AttentionGroupPlan:
    model_worker: str  # "<decode or mixed pool>-<i>": rank 0
    attention_workers: tuple[str, ...]  # in shard order: attention_workers[s] is shard s, rank s + 1

    @property
    def name(self) -> str:
        """The group's name (GroupSpec.name): ``attn/<model worker id>``."""
        return f"attn/{self.model_worker}"

    @property
    def members(self) -> tuple[str, ...]:
        """Worker ids in rank order: the model worker, then its attention workers."""
        return (self.model_worker, *self.attention_workers)


def plan_attention_groups(config: ServeConfig) -> tuple[AttentionGroupPlan, ...]:
    """One plan per decode-capable worker, in config order (module docstring); () without an
    attention pool."""
    att = config.attention_pool()
    if att is None:
        return ()
    models = [f"{p.name}-{i}" for p in config.pools if p.role in DECODE_CAPABLE for i in range(p.num_workers)]
    per_model = att.num_workers // len(models)  # exact: the config checked the division
    return tuple(
        AttentionGroupPlan(model, tuple(f"{att.name}-{j}" for j in range(i * per_model, (i + 1) * per_model)))
        for i, model in enumerate(models)
    )


def group_of(plans: tuple[AttentionGroupPlan, ...], worker_id: str) -> AttentionGroupPlan | None:
    """The plan ``worker_id`` is a member of (as model worker or attention worker), else None
    (a prefill worker, or no attention pool)."""
    return next((p for p in plans if worker_id in p.members), None)


def model_worker_blocks(plans: tuple[AttentionGroupPlan, ...], blocks_per_worker: int) -> dict[str, list[int]]:
    """Blocks per attention worker in shard order, by model worker id: what each model worker's
    OffloadedEngine is built with (one sub-pool per attention worker of its own group)."""
    return {p.model_worker: [blocks_per_worker] * len(p.attention_workers) for p in plans}
