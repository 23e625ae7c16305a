"""Sharded expert loading through the ExpertDispatcher seam: a model built with a dispatcher
that holds a subset of experts has only those slots, filled from per-expert tensors or
from transformers 5's fused [E, ...] stacks, and never reads another rank's experts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.config import ModelConfig
from engine.models.loader import load_model
from engine.models.moe import LocalExperts

HELD = (1, 3)


class _Holds:
    """A dispatcher stub holding HELD of every layer (dispatch is never called here)."""

    def __init__(self) -> None:
        self.registered: dict[int, nn.Module] = {}

    def held_experts(self, layer: int, num_experts: int) -> Sequence[int]:
        return HELD

    def register(self, layer: int, experts: nn.Module) -> None:
        self.registered[layer] = experts

    def dispatch(self, layer, hidden, topk_weights, topk_ids):  # pragma: no cover - not run
        raise AssertionError("not used")


def _fuse(src: str, dst: str) -> None:
    """Rewrite a per-expert Qwen-MoE checkpoint with fused gate_up_proj / down_proj stacks."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, layers = {}, sorted({int(k.split(".")[2]) for k in tensors if ".experts." in k})
    for name, t in tensors.items():
        if ".experts." not in name:
            out[name] = t
    for layer in layers:
        p = f"model.layers.{layer}.mlp.experts"
        n = len({k.split(".")[5] for k in tensors if k.startswith(p + ".")})
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat((tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"])) for e in range(n)]
        )
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    save_file(out, os.path.join(dst, "model.safetensors"))


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused-stacks"])
def test_a_rank_loads_only_its_experts(tiny_checkpoint, tmp_path, fused: bool) -> None:
    ckpt = tiny_checkpoint("qwen3_moe")
    if fused:
        _fuse(ckpt, str(tmp_path / "fused"))
        ckpt = str(tmp_path / "fused")
    cfg = ModelConfig.from_hf_dir(ckpt)
    full = load_model(ckpt, cfg, torch.float32, "cpu", 64)
    stub = _Holds()
    part = load_model(ckpt, cfg, torch.float32, "cpu", 64, dispatcher=stub)
    assert sorted(stub.registered) == list(range(cfg.num_layers))
    for layer in range(cfg.num_layers):
        mine, ref = part.layers[layer].mlp.experts, full.layers[layer].mlp.experts
        assert isinstance(mine, LocalExperts) and mine.expert_ids == HELD and mine.w13.shape[0] == len(HELD)
        assert stub.registered[layer] is mine
        assert torch.equal(mine.w13, ref.w13[list(HELD)]) and torch.equal(mine.w2, ref.w2[list(HELD)])
        torch.testing.assert_close(part.layers[layer].attn.qkv, full.layers[layer].attn.qkv, rtol=0, atol=0)
