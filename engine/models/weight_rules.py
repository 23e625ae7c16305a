"""Mapping rules from Hugging Face tensor names to DecoderLM parameters (with fusion).

A rule matches a HF name (after the ``model.`` prefix is stripped) and names the target
parameter; ``expert`` selects a slot of a stacked [E, ...] parameter by a regex group,
``half`` selects the first/second half of a fused gate|up weight, ``qkv`` one of q/k/v.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str  # format string over the regex groups
    expert: int | None = None  # regex group holding the expert index
    half: int | None = None  # 0 = gate rows, 1 = up rows of a fused [2I, H] weight
    qkv: str | None = None  # "q" | "k" | "v" rows of the fused qkv weight/bias

    def match(self, name: str) -> re.Match | None:
        return re.fullmatch(self.pattern, name)


DENSE_RULES: list[Rule] = [
    Rule(r"embed_tokens\.weight", "embed"),
    Rule(r"lm_head\.weight", "lm_head"),
    Rule(r"norm\.weight", "norm.weight"),
    Rule(r"layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.input_norm.weight"),
    Rule(r"layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.post_attn_norm.weight"),
    Rule(r"layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{0}.attn.qkv", qkv="q"),
    Rule(r"layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{0}.attn.qkv", qkv="k"),
    Rule(r"layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{0}.attn.qkv", qkv="v"),
    Rule(r"layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.{0}.attn.qkv_bias", qkv="q"),
    Rule(r"layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.{0}.attn.qkv_bias", qkv="k"),
    Rule(r"layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.{0}.attn.qkv_bias", qkv="v"),
    Rule(r"layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attn.o"),
    Rule(r"layers\.(\d+)\.self_attn\.q_norm\.weight", "layers.{0}.attn.q_norm.weight"),
    Rule(r"layers\.(\d+)\.self_attn\.k_norm\.weight", "layers.{0}.attn.k_norm.weight"),
    Rule(r"layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.mlp.gate_up", half=0),
    Rule(r"layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.mlp.gate_up", half=1),
    Rule(r"layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.mlp.down"),
]

# Tensors some checkpoints carry that the runtime recomputes.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
