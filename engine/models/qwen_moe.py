"""Qwen2-MoE (sigmoid-gated shared expert, optional dense layers) and Qwen3-MoE (q/k norm).

Both name experts ``mlp.experts.{e}.{gate,up,down}_proj``; transformers 5 may also store
them fused as ``mlp.experts.gate_up_proj [E, 2I, H]`` / ``mlp.experts.down_proj [E, H, I]``.
"""

from engine.models.weight_rules import Rule

WEIGHT_RULES: list[Rule] = [
    Rule(r"layers\.(\d+)\.mlp\.gate\.weight", "layers.{0}.mlp.gate"),
    Rule(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight", "layers.{0}.mlp.experts.w13", expert=1, half=0),
    Rule(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight", "layers.{0}.mlp.experts.w13", expert=1, half=1),
    Rule(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight", "layers.{0}.mlp.experts.w2", expert=1),
    Rule(r"layers\.(\d+)\.mlp\.experts\.gate_up_proj", "layers.{0}.mlp.experts.w13"),
    Rule(r"layers\.(\d+)\.mlp\.experts\.down_proj", "layers.{0}.mlp.experts.w2"),
    Rule(r"layers\.(\d+)\.mlp\.shared_expert\.gate_proj\.weight", "layers.{0}.mlp.shared.gate_up", half=0),
    Rule(r"layers\.(\d+)\.mlp\.shared_expert\.up_proj\.weight", "layers.{0}.mlp.shared.gate_up", half=1),
    Rule(r"layers\.(\d+)\.mlp\.shared_expert\.down_proj\.weight", "layers.{0}.mlp.shared.down"),
    Rule(r"layers\.(\d+)\.mlp\.shared_expert_gate\.weight", "layers.{0}.mlp.shared_gate"),
]
