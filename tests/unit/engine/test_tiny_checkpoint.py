"""engine.models.tiny: random-weight HF checkpoints + offline tokenizer, loadable by transformers."""

from __future__ import annotations

import json
import os

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.models import tiny
from engine.models.tiny import CHAT_TEMPLATE, TINY_FAMILIES, build_tiny_checkpoint

TEXT = "The harbour town woke slowly. Zebras quietly jumped 1234 times!\n\n  Café über naïve, ok?"


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_loads_in_transformers(tiny_checkpoint, family: str) -> None:
    path = tiny_checkpoint(family)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.architectures == [tiny.FAMILIES[family][1]]
    assert model.config.vocab_size == 512 and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[5, 17, 300, 42, 2]])
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, V]
    assert logits.shape == (1, 5, 512) and torch.isfinite(logits).all()
    # the engine's own config parser accepts every family
    parsed = ModelConfig.from_hf_dir(path)
    assert parsed.architecture == tiny.FAMILIES[family][1]
    assert parsed.eos_token_ids == (2,) and parsed.vocab_size == 512


def test_family_specific_features(tiny_checkpoint) -> None:
    assert ModelConfig.from_hf_dir(tiny_checkpoint("llama3")).rope.kind == "llama3"
    qwen2 = _state_dict(tiny_checkpoint("qwen2"))
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2
    qwen3 = ModelConfig.from_hf_dir(tiny_checkpoint("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 != qwen3.hidden_size // qwen3.num_heads
    mixtral = ModelConfig.from_hf_dir(tiny_checkpoint("mixtral"))
    assert (mixtral.moe.num_experts, mixtral.moe.top_k) == (4, 2)
    qwen2_moe = ModelConfig.from_hf_dir(tiny_checkpoint("qwen2_moe"))
    assert qwen2_moe.moe.shared_intermediate_size > 0
    assert ModelConfig.from_hf_dir(tiny_checkpoint("mistral", sliding_window=8)).sliding_window == 8


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe"])
def test_tokenizer_round_trips_and_matches_autotokenizer(tiny_checkpoint, family: str) -> None:
    path = tiny_checkpoint(family)
    raw = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(path)
    ids = raw.encode(TEXT).ids
    assert raw.decode(ids) == TEXT
    # transformers may pick a model-specific class (Qwen2Tokenizer); ids must not change
    assert auto.encode(TEXT) == ids
    assert auto.decode(ids) == TEXT
    assert len(auto) == raw.get_vocab_size() == 512
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)
    assert max(ids) < 512 and len(ids) < len(TEXT.encode())  # merges were learned


def test_chat_template_renders_turns(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE
    auto = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"


def test_vocab_padded_to_exact_size(tmp_path) -> None:
    path = build_tiny_checkpoint(tmp_path, vocab_size=1000)
    raw = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    assert raw.get_vocab_size() == 1000
    assert raw.decode(raw.encode(TEXT).ids) == TEXT
    assert _state_dict(path)["model.embed_tokens.weight"].shape == (1000, 64)


def test_overrides_reach_the_config(tmp_path) -> None:
    path = build_tiny_checkpoint(
        tmp_path, family="qwen3", num_key_value_heads=1, head_dim=48, tie_word_embeddings=True, initializer_range=0.05
    )
    cfg = ModelConfig.from_hf_dir(path)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (1, 48, True)
    tensors = _state_dict(path)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (48, 64)
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].std().item() == pytest.approx(0.05, rel=0.1)


def test_bad_arguments_fail_loudly(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_checkpoint(tmp_path, family="gpt2")
    with pytest.raises(TypeError, match="num_kv_heads"):
        build_tiny_checkpoint(tmp_path, num_kv_heads=1)  # typo of num_key_value_heads
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_checkpoint(tmp_path, vocab_size=100)


def test_weights_are_deterministic_per_seed(tmp_path) -> None:
    a = _state_dict(build_tiny_checkpoint(tmp_path / "a", family="mixtral", seed=3))
    b = _state_dict(build_tiny_checkpoint(tmp_path / "b", family="mixtral", seed=3))
    c = _state_dict(build_tiny_checkpoint(tmp_path / "c", family="mixtral", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    norm = a["model.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm)) and abs(norm.mean().item() - 1.0) < 0.1


def test_global_rng_is_untouched(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_sharded_checkpoint_has_index_and_same_weights(tmp_path) -> None:
    sharded = build_tiny_checkpoint(tmp_path / "sharded", family="qwen2_moe", sharded=True)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(n for n in os.listdir(sharded) if n.endswith(".safetensors"))
    assert len(shards) > 1 and set(weight_map.values()) == set(shards)
    single = build_tiny_checkpoint(tmp_path / "single", family="qwen2_moe")
    assert os.listdir(single).count("model.safetensors") == 1
    a, b = _state_dict(sharded), _state_dict(single)
    assert a.keys() == b.keys() == weight_map.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"], info


def test_cache_reuses_identical_builds_and_rebuilds_changed_ones(tmp_path, monkeypatch) -> None:
    path = build_tiny_checkpoint(tmp_path, family="llama", sharded=True, seed=1)
    assert os.path.exists(os.path.join(path, tiny.STAMP_FILE))

    def fail(*args, **kwargs):
        raise AssertionError("identical arguments must not rebuild")

    with monkeypatch.context() as patch:
        patch.setattr(tiny, "_save_model", fail)
        assert build_tiny_checkpoint(tmp_path, family="llama", sharded=True, seed=1) == path

    # different arguments in the same directory: rebuilt, and no stale shards survive
    build_tiny_checkpoint(tmp_path, family="llama", sharded=False, seed=1)
    names = os.listdir(path)
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not [n for n in names if n.startswith("model-")]
    user_file = os.path.join(path, "notes.txt")
    with open(user_file, "w") as f:
        f.write("not ours")
    build_tiny_checkpoint(tmp_path, family="llama", seed=2)
    assert os.path.exists(user_file)  # only files the builder writes are removed
