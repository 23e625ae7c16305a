"""Mixtral: Llama attention + sparse MoE (``block_sparse_moe``; experts w1=gate, w3=up, w2=down).

Routing is softmax -> top-k -> renormalise (``MoEConfig.norm_topk_prob=True``).
"""

from engine.models.weight_rules import Rule

WEIGHT_RULES: list[Rule] = [
    Rule(r"layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{0}.mlp.gate"),
    Rule(
        r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", "layers.{0}.mlp.experts.w13", expert=1, half=0
    ),
    Rule(
        r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", "layers.{0}.mlp.experts.w13", expert=1, half=1
    ),
    Rule(r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", "layers.{0}.mlp.experts.w2", expert=1),
]
