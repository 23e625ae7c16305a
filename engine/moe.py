"""The ExpertDispatcher seam: how an MoE layer hands its routed tokens to whoever runs experts.

The MoE layer (engine/models/moe.py) computes router probabilities and top-k choices; a
dispatcher runs the chosen experts and returns the weighted sum. The local dispatcher
(engine/models/moe.py) runs them in-process; an expert-parallel dispatcher (expert_router)
sends tokens to the workers owning the experts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ExpertDispatcher(Protocol):
    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden: [T, H]; topk_weights: [T, k] (hidden dtype); topk_ids: [T, k] int64 -> [T, H]."""
        ...
