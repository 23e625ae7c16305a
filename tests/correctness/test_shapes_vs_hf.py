"""Model-shape variants against transformers: GQA ratios incl. MQA, head_dim not 64, tied
embeddings, MoE top-1/top-2 and dense layers, RoPE scalings, sliding window, sharded files.

Every variant runs a mixed-length batch with prefix caching and a chunked 24-token budget
(so prompt chunks and decodes share steps), then checks the pool is free again.
"""

from __future__ import annotations

import pytest

from engine import LLM
from engine.config import ModelConfig
from tests.correctness.hf_ref import StepLog, assert_matches_hf, hf_greedy, random_prompts

MAX_NEW = 32

VARIANTS: dict[str, tuple[str, dict]] = {
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-gqa4-hd8": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "qwen2-mqa-hd48": ("qwen2", {"hidden_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}),
    "qwen3-gqa2-hd24": ("qwen3", {"head_dim": 24, "num_attention_heads": 6, "num_key_value_heads": 3}),
    "mistral-mqa-hd48": ("mistral", {"head_dim": 48, "num_key_value_heads": 1}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mixtral-top1": ("mixtral", {"num_experts_per_tok": 1}),
    "mixtral-top2-8experts": ("mixtral", {"num_experts_per_tok": 2, "num_local_experts": 8}),
    "qwen2_moe-top1-dense0": ("qwen2_moe", {"num_experts_per_tok": 1, "mlp_only_layers": [0]}),
    "qwen2_moe-top2-normtopk": ("qwen2_moe", {"num_experts_per_tok": 2, "norm_topk_prob": True}),
    "qwen3_moe-top1": ("qwen3_moe", {"num_experts_per_tok": 1}),
    "qwen3_moe-sparse-step2": ("qwen3_moe", {"decoder_sparse_step": 2}),
    "llama3-rope": ("llama3", {}),
    "llama-rope-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    "llama-rope-theta": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
    "llama-3layers-wide": ("llama", {"num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 96}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_hf(tiny_checkpoint, variant):
    family, overrides = VARIANTS[variant]
    ckpt = tiny_checkpoint(family, **overrides)
    _check_parsed(ModelConfig.from_hf_dir(ckpt), family, overrides)
    llm = LLM(model=ckpt, block_size=8, num_blocks=128, max_num_batched_tokens=24, attention_backend="sdpa")
    log = StepLog(llm)
    assert_matches_hf(ckpt, llm, random_prompts(seed=11), MAX_NEW)
    assert log.num_partial_prefills > 0


def _check_parsed(cfg: ModelConfig, family: str, overrides: dict) -> None:
    """The variant really reached the engine (a silently ignored override tests nothing)."""
    if "num_key_value_heads" in overrides:
        assert cfg.num_kv_heads == overrides["num_key_value_heads"]
    if "head_dim" in overrides:
        assert cfg.head_dim == overrides["head_dim"]
    if "tie_word_embeddings" in overrides:
        assert cfg.tie_word_embeddings
    if "num_experts_per_tok" in overrides:
        assert cfg.moe is not None and cfg.moe.top_k == overrides["num_experts_per_tok"]
    if "mlp_only_layers" in overrides:
        assert cfg.moe is not None and cfg.moe.dense_layers == tuple(overrides["mlp_only_layers"])
    if "decoder_sparse_step" in overrides:  # transformers: layer i is sparse iff (i + 1) % step == 0
        step = overrides["decoder_sparse_step"]
        assert cfg.moe is not None and cfg.moe.dense_layers == tuple(i for i in range(cfg.num_layers) if (i + 1) % step)
    if family == "llama3":
        assert cfg.rope.kind == "llama3"
    if "rope_parameters" in overrides:
        assert cfg.rope.kind == overrides["rope_parameters"]["rope_type"]
        assert cfg.rope.theta == overrides["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_moe"])
def test_sharded_checkpoint_matches_hf(tiny_checkpoint, family):
    ckpt = tiny_checkpoint(family, sharded=True)
    import os

    assert os.path.exists(os.path.join(ckpt, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(ckpt) if f.endswith(".safetensors")]) > 1
    llm = LLM(model=ckpt, block_size=16, num_blocks=64, attention_backend="sdpa")
    assert_matches_hf(ckpt, llm, random_prompts(seed=12), MAX_NEW)


@pytest.mark.parametrize("chunk", [2048, 8], ids=["whole", "chunk8"])
def test_sliding_window_matches_hf(tiny_checkpoint, chunk):
    window = 8
    ckpt = tiny_checkpoint("mistral", sliding_window=window)
    full = tiny_checkpoint("mistral")  # same weights, full attention
    assert ModelConfig.from_hf_dir(ckpt).sliding_window == window
    prompts = random_prompts(seed=13, lengths=(3, 7, 20, 45))
    llm = LLM(model=ckpt, block_size=4, num_blocks=128, max_num_batched_tokens=chunk, attention_backend="sdpa")
    assert_matches_hf(ckpt, llm, prompts, MAX_NEW)
    # the window changes the result, so matching HF above really exercised it
    assert any(hf_greedy(ckpt, p, MAX_NEW) != hf_greedy(full, p, MAX_NEW) for p in prompts)
