"""Fixtures of the correctness suite that need more than a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.real_model import PROMPTS, real_model_dir, real_model_gguf, transformers_module


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct as a .gguf path (tests/real_model.py: skip locally, fail in CI)."""
    return real_model_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: str) -> str:
    """The converted Hugging Face directory of ``smollm2_gguf``."""
    return real_model_dir()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_dir: str):
    return transformers_module().AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def hf_model(smollm2_dir: str):
    return transformers_module().AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def chat_prompts(hf_tokenizer) -> list[list[int]]:
    """Each prompt as one user turn in the model's chat template (chat_template.jinja), token ids."""
    out = []
    for text in PROMPTS:
        rendered = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" + text in rendered
        out.append(hf_tokenizer(rendered, add_special_tokens=False).input_ids)
    return out
