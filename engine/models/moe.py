"""MoE layer: routing in the model, expert execution behind the ExpertDispatcher seam.

``MoEBlock`` computes router probabilities and top-k choices and hands the tokens to an
``engine.moe.ExpertDispatcher``; ``LocalExpertDispatcher`` runs the experts in-process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MoEConfig
from engine.models.layers import GatedMLP, linear
from engine.moe import ExpertDispatcher


class LocalExperts(nn.Module):
    """One layer's routed experts, stacked: w13 [E, 2I, H] (gate; up), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x: [n, H] tokens routed to expert e -> [n, H] (unweighted)."""
        gate, up = linear(x, self.w13[e]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2[e])


class LocalExpertDispatcher:
    """Runs every expert in this process. ``experts[layer]`` holds that layer's weights."""

    def __init__(self) -> None:
        self.experts: dict[int, LocalExperts] = {}

    def register(self, layer: int, experts: LocalExperts) -> None:
        self.experts[layer] = experts

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return combine_local(self.experts[layer], hidden, topk_weights, topk_ids)


def combine_local(
    experts: LocalExperts, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Run the experts each token chose and sum their outputs weighted by ``topk_weights``."""
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=experts.w13.shape[0]).tolist()
    k = topk_ids.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start : start + n]  # flat (token, slot) indices routed to expert e
        start += n
        tok = sel // k
        y = experts.run_expert(e, hidden[tok]) * topk_weights.reshape(-1)[sel, None]
        out.index_add_(0, tok, y)
    return out


class MoEBlock(nn.Module):
    """Router + dispatched experts (+ Qwen2-MoE's sigmoid-gated shared expert)."""

    def __init__(self, layer: int, hidden: int, cfg: MoEConfig, dispatcher: ExpertDispatcher):
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.dispatcher = dispatcher
        self.shared: GatedMLP | None = None
        self.shared_gate: nn.Parameter | None = None
        if cfg.shared_intermediate_size:
            self.shared = GatedMLP(hidden, cfg.shared_intermediate_size)
            self.shared_gate = nn.Parameter(torch.empty(1, hidden))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (router_logits [T, E], topk_weights [T, k], topk_ids [T, k])."""
        logits = linear(x, self.gate)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, weights, ids = self.route(x)
        out = self.dispatcher.dispatch(self.layer, x, weights, ids)
        if self.shared is not None:
            out = out + torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)
        return out
