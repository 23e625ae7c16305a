"""Checkpoint loading: unsupported architectures, missing / unexpected / mis-shaped tensors,
sharded == single-file, tied embeddings, and fused weights equal to the HF tensors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM
from engine.config import ModelConfig, UnsupportedModelError
from engine.models.loader import WeightLoadError, load_model, safetensors_files


def load(path: str):
    cfg = ModelConfig.from_hf_dir(path)
    return load_model(path, cfg, torch.float32, "cpu", 64)


def copy_ckpt(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: str, edit) -> None:
    """Load the single-file checkpoint's tensors, ``edit(dict)`` them, save them back."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama")


def test_unsupported_architecture_names_it(llama, tmp_path):
    path = copy_ckpt(llama, tmp_path / "gpt2")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(model=path)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):  # lists what is supported
        ModelConfig.from_hf_dir(path)


def test_unsupported_rope_type_is_rejected():
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    assert ModelConfig.from_hf_dict(base).rope.kind == "default"
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_hf_dict({**base, "hidden_act": "gelu"})


def test_missing_tensor_is_an_error(llama, tmp_path):
    path = copy_ckpt(llama, tmp_path / "missing")
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"layers\.1\.attn\.qkv"):
        load(path)


def test_unexpected_tensor_is_an_error(llama, tmp_path):
    path = copy_ckpt(llama, tmp_path / "extra")
    rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}))
    with pytest.raises(WeightLoadError, match="bogus"):
        load(path)


def test_misshaped_tensor_is_an_error(llama, tmp_path):
    path = copy_ckpt(llama, tmp_path / "shape")
    name = "model.layers.0.mlp.down_proj.weight"
    rewrite_weights(path, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(WeightLoadError, match="down_proj"):
        load(path)


def test_no_weights_is_an_error(llama, tmp_path):
    path = copy_ckpt(llama, tmp_path / "empty")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files in"):
        load(path)


def test_sharded_load_equals_single_file(tiny_checkpoint):
    for family in ("llama", "qwen2_moe"):
        single = tiny_checkpoint(family)
        sharded = tiny_checkpoint(family, sharded=True)
        assert len(safetensors_files(sharded)) > 1 and len(safetensors_files(single)) == 1
        a, b = load(single).state_dict(), load(sharded).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_fused_weights_hold_the_hf_tensors(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")  # q/k/v biases too
    hf = load_file(os.path.join(path, "model.safetensors"))
    model = load(path)
    cfg = model.cfg
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = model.layers[1].attn
    assert torch.equal(attn.qkv[:q], hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(attn.qkv[q : q + kv], hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(attn.qkv[q + kv :], hf["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(attn.qkv_bias[q + kv :], hf["model.layers.1.self_attn.v_proj.bias"])
    inter = cfg.intermediate_size
    mlp = model.layers[0].mlp
    assert torch.equal(mlp.gate_up[:inter], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(mlp.gate_up[inter:], hf["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings_share_the_embedding(tiny_checkpoint):
    path = tiny_checkpoint("llama", tie_word_embeddings=True)
    model = load(path)
    assert model.cfg.tie_word_embeddings and model.lm_head is None
    hidden = torch.randn(3, model.cfg.hidden_size)
    assert torch.allclose(model.compute_logits(hidden), hidden @ model.embed.T)
