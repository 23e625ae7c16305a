"""Write a tiny Hugging Face Llama checkpoint as a GGUF file, the way llama.cpp's
convert_hf_to_gguf.py does (tensor names, Q/K rotary permutation, tokenizer metadata).

Test helper for tests/unit/engine/test_gguf.py: converting the result back must give the
source checkpoint (exactly for F32; ``dequantize(quantize(w))`` for quantized tensors).
``permute_like_llama_cpp`` is a transcription of ``LlamaModel.permute`` in llama.cpp, not a
call of the inverse under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# HF name (after "model.") -> GGUF name
_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_like_llama_cpp(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    short = hf_name.removeprefix("model.")
    if short.startswith("layers."):
        _, layer, rest = short.split(".", 2)
        return f"blk.{layer}.{_NAMES[rest]}"
    return _NAMES[short]


def read_tokenizer(ckpt: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) of a tokenizer.json; added special tokens are CONTROL (3)."""
    data = json.loads((ckpt / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = set()
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
        if added["special"]:
            special.add(added["id"])
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def export_gguf(
    ckpt: str | Path,
    out: str | Path,
    *,
    quant: str | None = None,
    architecture: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "qwen2",
    add_bos: bool = False,
    raw_tensors: dict[str, tuple[np.ndarray, Any]] | None = None,
) -> Path:
    """Write ``ckpt`` (a tiny llama dir) as GGUF ``out``.

    ``quant="Q8_0"`` stores every 2-D weight as Q8_0; ``raw_tensors`` adds tensors as
    ``name -> (array, GGMLQuantizationType or None)`` unchecked (a quantized array holds the
    block bytes, one row per tensor row).
    """
    import gguf
    from safetensors.numpy import load_file

    ckpt, out = Path(ckpt), Path(out)
    cfg = json.loads((ckpt / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), architecture)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    tokens, types, merges = read_tokenizer(ckpt)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(add_bos)
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])
    state = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(file)))
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        data = tensor.astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = permute_like_llama_cpp(data, heads, heads)
        elif name.endswith("k_proj.weight"):
            data = permute_like_llama_cpp(data, heads, kv_heads)
        if quant is not None and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    for name, (data, qtype) in (raw_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
