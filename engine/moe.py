"""The ExpertDispatcher seam: how an MoE layer hands its routed tokens to whoever runs experts.

The MoE layer (engine/models/moe.py) computes router probabilities and top-k choices; a
dispatcher runs the chosen experts and returns the weighted sum. The local dispatcher
(engine/models/moe.py) runs them in-process; an expert-parallel dispatcher (expert_router)
sends tokens to the workers owning the experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ExpertDispatcher(Protocol):
    """Lifecycle: the model asks ``held_experts`` and calls ``register`` once per MoE layer
    while it is built (on the meta device; the loader fills the registered module's weights
    in place afterwards), then ``dispatch`` once per MoE layer per forward."""

    def held_experts(self, layer: int, num_experts: int) -> Sequence[int]:
        """The global ids of ``layer``'s routed experts whose weights this process holds,
        ascending: the slot order of the layer's ``LocalExperts``. All ``num_experts`` for a
        local dispatcher, a 1/N share under expert parallelism (the loader reads only these)."""
        ...

    def register(self, layer: int, experts: nn.Module) -> None:
        """``experts``: the layer's ``engine.models.moe.LocalExperts`` (held experts only)."""
        ...

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden: [T, H]; topk_weights: [T, k] (hidden dtype); topk_ids: [T, k] int64 -> [T, H]."""
        ...
