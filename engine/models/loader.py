"""Load a Hugging Face safetensors directory (single file or sharded with an index).

A .gguf path is first resolved to its converted directory (engine/models/gguf.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.models import mixtral, qwen_moe
from engine.models.gguf import resolve_model_path
from engine.models.llama import DecoderLM
from engine.models.moe import LocalExperts
from engine.models.weight_rules import DENSE_RULES, IGNORED, Rule
from engine.moe import ExpertDispatcher

log = logging.getLogger(__name__)

FAMILY_RULES: dict[str, list[Rule]] = {
    "llama": DENSE_RULES,
    "mixtral": mixtral.WEIGHT_RULES + DENSE_RULES,
    "qwen2_moe": qwen_moe.WEIGHT_RULES + DENSE_RULES,
    "qwen3_moe": qwen_moe.WEIGHT_RULES + DENSE_RULES,
}


class WeightLoadError(ValueError):
    """A checkpoint tensor is unknown, mis-shaped, or a model parameter was never loaded."""


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    return files


def load_model(
    path: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: str,
    max_positions: int,
    dispatcher: ExpertDispatcher | None = None,
    progress: bool = False,
) -> DecoderLM:
    """Build a DecoderLM for ``cfg`` and fill every parameter from the checkpoint at ``path``.

    ``path`` is a HF directory or a .gguf file (read from its cached conversion, see gguf.py).
    """
    path = resolve_model_path(path, progress=progress)
    model = empty_model(cfg, max_positions, dtype, device, dispatcher)
    params = dict(model.named_parameters())
    held = held_expert_slots(model)
    loaded: dict[str, int] = {}  # param name -> elements written
    rules = FAMILY_RULES[cfg.family]
    files = safetensors_files(path)
    for i, file in enumerate(files):
        if progress:
            log.info("loading weights %d/%d: %s", i + 1, len(files), os.path.basename(file))
        with safe_open(file, "pt", device="cpu") as f:
            for name in f.keys():
                _load_tensor(cfg, rules, params, held, loaded, name, f)
    missing = [n for n, p in params.items() if loaded.get(n, 0) != p.numel()]
    if missing:
        raise WeightLoadError(f"checkpoint {path!r} did not provide: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


def empty_model(
    cfg: ModelConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device | str,
    dispatcher: ExpertDispatcher | None = None,
) -> DecoderLM:
    """A DecoderLM for ``cfg`` with uninitialised parameters on ``device`` (built on the meta
    device, so nothing is initialised twice) and its rope tables computed there in fp32."""
    with torch.device("meta"):
        model = DecoderLM(cfg, max_positions, dispatcher)
    model = model.to_empty(device=device).to(dtype)
    # rope tables are buffers computed at construction; rebuild them on the real device in fp32
    model.rope.__init__(cfg.rope, cfg.head_dim, max_positions)
    model.rope.to(device)
    return model


def match_tensor(
    cfg: ModelConfig, rules: list[Rule], params: dict[str, torch.Tensor], name: str
) -> tuple[str, Rule, re.Match[str]] | None:
    """The parameter a checkpoint tensor fills: (parameter name, its rule, the rule's match);
    None for a tensor the model does not use (rotary caches, a tied lm_head). Raises
    WeightLoadError for a tensor no rule knows or one naming no parameter of the model."""
    if IGNORED.match(name):
        return None
    short = name.removeprefix("model.")
    if short == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    for rule in rules:
        m = rule.match(short)
        if m is None:
            continue
        target = rule.target.format(*m.groups())
        if target not in params:
            raise WeightLoadError(f"checkpoint tensor {name!r} maps to unknown parameter {target!r}")
        return target, rule, m
    raise WeightLoadError(f"unexpected checkpoint tensor {name!r} for architecture {cfg.architecture}")


def held_expert_slots(model: DecoderLM) -> dict[str, dict[int, int]]:
    """Expert-stack parameter name -> {global expert id: slot} for every MoE layer whose
    ``LocalExperts`` holds a subset of the experts (an expert-parallel rank's share)."""
    out: dict[str, dict[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LocalExperts) and module.expert_ids != tuple(range(model.cfg.moe.num_experts)):
            for p in ("w13", "w2"):
                out[f"{name}.{p}"] = module.slot_of()
    return out


def _load_tensor(cfg: ModelConfig, rules, params, held, loaded, name: str, f) -> None:
    """Copy checkpoint tensor ``name`` of the open safetensors file ``f`` into its parameter,
    reading only the held experts' rows of a fused [E, ...] stack (none of another rank's)."""
    found = match_tensor(cfg, rules, params, name)
    if found is None:
        return
    target, rule, m = found
    slot_of = held.get(target)
    if slot_of is not None and rule.expert is not None and int(m.group(rule.expert + 1)) not in slot_of:
        return  # an expert another expert-parallel rank holds
    if slot_of is not None and rule.expert is None:
        stack = f.get_slice(name)  # fused [E, ...] stack: read the held experts' rows only
        tensor = torch.cat([stack[e : e + 1] for e in sorted(slot_of)])
    else:
        tensor = f.get_tensor(name)
    dst = destination(cfg, params[target], rule, m, slot_of)
    if dst.shape != tensor.shape:
        raise WeightLoadError(f"{name!r}: shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(tensor)
    loaded[target] = loaded.get(target, 0) + tensor.numel()


def destination(
    cfg: ModelConfig, param: torch.Tensor, rule: Rule, m, slot_of: dict[int, int] | None = None
) -> torch.Tensor:
    """The slice of ``param`` that the matched checkpoint tensor fills. ``slot_of``: global
    expert id -> slot of an expert stack holding a subset of the experts (None: all, slot = id)."""
    dst = param.data
    if rule.expert is not None:
        e = int(m.group(rule.expert + 1))
        dst = dst[e if slot_of is None else slot_of[e]]
    if rule.half is not None:
        half = dst.shape[0] // 2
        dst = dst[:half] if rule.half == 0 else dst[half:]
    if rule.qkv is not None:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[rule.qkv]
        dst = dst[start : start + size]
    return dst
