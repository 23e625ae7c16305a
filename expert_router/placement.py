"""Expert placement: which rank of an expert-parallel (EP) group holds each routed expert.

An ``ExpertPlacement`` maps, for every MoE layer, each global expert id to the EP rank that
holds its weights. It is balanced: the ranks' expert counts differ by at most one (equal
when the group size divides the expert count), so every rank holds the same memory.

- ``ExpertPlacement.contiguous``: rank r holds experts [r*E/N, (r+1)*E/N) of every layer
  (plain EP, and the placement without a routing log).
- ``expert_router.seg.coactivation_placement``: s-EG, clustered from a routing log.

Serialised as JSON: {"world_size": N, "owners": {"<layer>": [rank of expert 0, ...]}}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from engine.config import ModelConfig


@dataclass(frozen=True)
class ExpertPlacement:
    world_size: int
    # MoE layer -> owners[e] = the rank holding global expert e (every expert of the layer)
    owners: Mapping[int, tuple[int, ...]]

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"ExpertPlacement.world_size must be >= 1, got {self.world_size}")
        if not self.owners:
            raise ValueError("ExpertPlacement.owners is empty: no MoE layer placed")
        for layer, owners in self.owners.items():
            if any(not 0 <= r < self.world_size for r in owners):
                raise ValueError(f"ExpertPlacement layer {layer}: owner ranks {owners} outside [0, {self.world_size})")
            counts = [sum(1 for r in owners if r == rank) for rank in range(self.world_size)]
            if max(counts) - min(counts) > 1:
                raise ValueError(f"ExpertPlacement layer {layer}: unbalanced, experts per rank {counts}")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int, layers: Iterable[int]) -> ExpertPlacement:
        """Rank r holds a contiguous block of expert ids, sizes differing by at most one
        (larger blocks first): 4 experts on 3 ranks -> [0, 0, 1, 2]."""
        if num_experts < world_size:
            raise ValueError(f"{num_experts} experts cannot be spread over {world_size} ranks (one each at least)")
        base, extra = divmod(num_experts, world_size)
        owners: list[int] = []
        for r in range(world_size):
            owners += [r] * (base + (1 if r < extra else 0))
        return cls(world_size, {int(layer): tuple(owners) for layer in layers})

    @property
    def layers(self) -> list[int]:
        return sorted(self.owners)

    def num_experts(self, layer: int) -> int:
        return len(self._owners(layer))

    def experts_of(self, layer: int, rank: int) -> tuple[int, ...]:
        """The global expert ids ``rank`` holds in ``layer``, ascending."""
        return tuple(e for e, r in enumerate(self._owners(layer)) if r == rank)

    def owner_table(self, layer: int) -> torch.Tensor:
        """[E] int64 on the CPU (explicitly: models are built under a meta device context):
        the owner rank of each expert (index with top-k ids)."""
        return torch.tensor(self._owners(layer), dtype=torch.int64, device="cpu")

    def _owners(self, layer: int) -> tuple[int, ...]:
        owners = self.owners.get(layer)
        if owners is None:
            raise KeyError(f"ExpertPlacement has no layer {layer} (placed MoE layers: {self.layers})")
        return owners

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps({"world_size": self.world_size, "owners": {str(k): list(v) for k, v in self.owners.items()}})

    @classmethod
    def from_json(cls, text: str) -> ExpertPlacement:
        data = json.loads(text)
        return cls(int(data["world_size"]), {int(k): tuple(int(r) for r in v) for k, v in data["owners"].items()})


def distinct_ranks(placement: ExpertPlacement, layer: int, topk_ids: Sequence[Sequence[int]]) -> list[int]:
    """Per token, the number of distinct ranks its top-k experts sit on (1 = one destination)."""
    owners = placement._owners(layer)
    return [len({owners[e] for e in row}) for row in topk_ids]


def moe_layers(cfg: ModelConfig) -> list[int]:
    """The layers whose MLP is an MoE block (every layer but ``moe.dense_layers``)."""
    if cfg.moe is None:
        raise ValueError(f"{cfg.architecture} is not a mixture-of-experts model: expert parallelism needs one")
    return [i for i in range(cfg.num_layers) if i not in cfg.moe.dense_layers]
