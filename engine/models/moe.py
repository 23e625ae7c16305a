"""MoE layer: routing in the model, expert execution behind the ExpertDispatcher seam.

``MoEBlock`` computes router probabilities and top-k choices and hands the tokens to an
``engine.moe.ExpertDispatcher``; ``LocalExpertDispatcher`` runs the experts in-process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import MoEConfig
from engine.models.layers import GatedMLP, linear
from engine.moe import ExpertDispatcher


class LocalExperts(nn.Module):
    """The routed experts of one layer this process holds, stacked: w13 [E_held, 2I, H]
    (gate; up), w2 [E_held, H, I]. ``expert_ids[slot]`` is the global expert id in that slot
    (ascending; ``range(E)`` when every expert is held)."""

    def __init__(self, expert_ids: Sequence[int], hidden: int, intermediate: int):
        super().__init__()
        self.expert_ids = tuple(int(e) for e in expert_ids)
        if list(self.expert_ids) != sorted(set(self.expert_ids)):
            raise ValueError(f"LocalExperts.expert_ids must be ascending and distinct, got {self.expert_ids}")
        n = len(self.expert_ids)
        self.w13 = nn.Parameter(torch.empty(n, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, intermediate))

    def slot_of(self) -> dict[int, int]:
        """global expert id -> slot."""
        return {e: s for s, e in enumerate(self.expert_ids)}

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x: [n, H] tokens routed to the expert in slot e -> [n, H] (unweighted)."""
        gate, up = linear(x, self.w13[e]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2[e])


class LocalExpertDispatcher:
    """Runs every expert in this process. ``experts[layer]`` holds that layer's weights."""

    def __init__(self) -> None:
        self.experts: dict[int, LocalExperts] = {}

    def held_experts(self, layer: int, num_experts: int) -> Sequence[int]:
        return range(num_experts)

    def register(self, layer: int, experts: nn.Module) -> None:
        assert isinstance(experts, LocalExperts)
        self.experts[layer] = experts

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return combine_local(self.experts[layer], hidden, topk_weights, topk_ids)


def combine_local(
    experts: LocalExperts, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_slots: torch.Tensor
) -> torch.Tensor:
    """Run the experts each token chose and sum their outputs weighted by ``topk_weights``,
    expert by expert in slot order (ascending global id) from zero.

    hidden: [T, H]; topk_weights: [T, k]; topk_slots: [T, k] slots of ``experts`` (equal to the
    global ids when every expert is held), -1 for a choice held elsewhere (skipped) -> [T, H]."""
    out = torch.zeros_like(hidden)
    n = experts.w13.shape[0]
    flat_ids = topk_slots.reshape(-1)
    flat_ids = torch.where(flat_ids < 0, n, flat_ids)  # skipped choices sort last, never run
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=n + 1).tolist()[:n]
    k = topk_slots.shape[1]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sel = order[start : start + c]  # flat (token, slot) indices routed to expert e
        start += c
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
