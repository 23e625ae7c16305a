"""SpeculativeConfig validation and the draft compatibility check."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.config import ModelConfig
from engine.spec.config import (
    MAX_SPECULATIVE_TOKENS,
    DraftIncompatibleError,
    SpeculativeConfig,
    check_draft_compatible,
)


def test_ngram_defaults_and_vllm_resolution():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max, c.policy, c.model) == (2, 5, "smartspec", None)
    # one bound alone sets both (vLLM's rule)
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}) == (
        SpeculativeConfig("ngram", 3, prompt_lookup_min=4, prompt_lookup_max=4)
    )
    lo_only = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 3})
    assert (lo_only.prompt_lookup_min, lo_only.prompt_lookup_max) == (3, 3)
    # vLLM's spelling of the n-gram method as a model name; a directory means draft_model
    assert SpeculativeConfig.from_dict({"model": "ngram", "num_speculative_tokens": 2}).method == "ngram"
    d = SpeculativeConfig.from_dict({"model": "/ckpt/draft", "num_speculative_tokens": 2, "policy": "fixed"})
    assert (d.method, d.model, d.policy, d.prompt_lookup_min) == ("draft_model", "/ckpt/draft", "fixed", None)


def test_round_trip_through_dict_and_json():
    c = SpeculativeConfig("draft_model", 5, model="/d", policy="fixed", acceptance_prior=0.7)
    assert SpeculativeConfig.from_dict(c.to_dict()) == c
    assert SpeculativeConfig.from_json(json.dumps(c.to_dict())) == c
    n = SpeculativeConfig("ngram", 4)
    assert SpeculativeConfig.from_dict(n.to_dict()) == n


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in [1, 16], got 0"),
        ({"method": "ngram", "num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be an integer"),
        ({"method": "ngram", "num_speculative_tokens": 2.0}, "num_speculative_tokens must be an integer"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of ['ngram', 'draft_model']"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model must name"),
        ({"method": "ngram", "model": "/d", "num_speculative_tokens": 2}, "speculative_config.model must be unset"),
        ({"method": "ngram", "num_speculative_tokens": 2, "policy": "adaptive"}, "speculative_config.policy"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "prompt_lookup_min (4) must be <= prompt_lookup_max (2)",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min must be in"),
        (
            {"method": "draft_model", "model": "/d", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
            "prompt_lookup_max applies to method ngram only",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "acceptance_prior": 1.0}, "acceptance_prior"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"num_speculative_tokens": 2}, "speculative_config.method is required"),
        ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, "unknown speculative_config keys ['k']"),
        ({"method": "ngram", "num_speculative_tokens": 2, "quantization": "fp8"}, "does not implement"),
    ],
)
def test_bad_config_names_the_field(fields, names):
    with pytest.raises(ValueError) as e:
        SpeculativeConfig.from_dict(fields)
    assert names in str(e.value)


def test_from_json_syntax_error_is_a_value_error():
    with pytest.raises(ValueError, match="speculative_config is not valid JSON"):
        SpeculativeConfig.from_json("{method: ngram}")


def test_draft_vocabulary_must_match(tiny_checkpoint):
    target = ModelConfig.from_hf_dir(tiny_checkpoint("llama"))
    same = ModelConfig.from_hf_dir(tiny_checkpoint("llama", num_hidden_layers=1, seed=3))
    check_draft_compatible(target, same)
    other = ModelConfig.from_hf_dir(tiny_checkpoint("qwen2", vocab_size=600))
    with pytest.raises(DraftIncompatibleError, match="draft vocab_size 600 differs from the target's 512"):
        check_draft_compatible(target, other)


def test_draft_tokenizer_must_match(tiny_checkpoint, tmp_path):
    target_dir = tiny_checkpoint("llama")
    draft_dir = tiny_checkpoint("llama", num_hidden_layers=1)
    target, draft = ModelConfig.from_hf_dir(target_dir), ModelConfig.from_hf_dir(draft_dir)
    check_draft_compatible(target, draft, target_dir, draft_dir)  # same tokenizer
    # same size, two token ids swapped: another tokenizer
    bad = tmp_path / "bad"
    shutil.copytree(draft_dir, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DraftIncompatibleError, match="draft tokenizer vocabulary differs"):
        check_draft_compatible(target, draft, target_dir, str(bad))
    # no tokenizer.json on one side: the size check alone decides
    (bad / "tokenizer.json").unlink()
    check_draft_compatible(target, draft, target_dir, str(bad))
