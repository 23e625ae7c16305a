"""The Triton paged-decode backend end to end against transformers.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET before triton is imported), which is slow, so these cases stay small:
a few prompts, 16 new tokens. Prompt chunks go through SDPA inside the backend; every
decode row goes through the kernel.
"""

from __future__ import annotations

import pytest

from engine import LLM
from engine.attention.triton_paged import TritonPagedBackend
from tests.correctness.hf_ref import assert_matches_hf, random_prompts

MAX_NEW = 16

CASES = {
    # GQA group 2, head_dim 32 (!= hidden / heads), q/k norm
    "qwen3-gqa2-hd32": ("qwen3", {}),
    # MQA (group 4), head_dim 48 (padded to 64 in the kernel), sliding window of 8 tokens
    "mistral-mqa-hd48-window8": ("mistral", {"head_dim": 48, "num_key_value_heads": 1, "sliding_window": 8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_matches_hf(tiny_checkpoint, case):
    family, overrides = CASES[case]
    ckpt = tiny_checkpoint(family, **overrides)
    llm = LLM(
        model=ckpt,
        block_size=8,
        num_blocks=64,
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
        attention_backend="triton",
    )
    assert isinstance(llm.engine.backend, TritonPagedBackend)
    prompts = random_prompts(seed=21, lengths=(3, 17, 30))
    assert_matches_hf(ckpt, llm, prompts, MAX_NEW)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_compiled_triton_on_cuda_matches_hf(tiny_checkpoint, family):
    """On a GPU the kernel is compiled, not interpreted: full-size batch, 32 tokens."""
    ckpt = tiny_checkpoint(family)
    llm = LLM(model=ckpt, device="cuda", block_size=16, num_blocks=256, attention_backend="triton")
    assert_matches_hf(ckpt, llm, random_prompts(seed=22), 32)
