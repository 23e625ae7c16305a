"""Greedy speculative decoding against transformers' full forward, and against no speculation.

For each proposer (n-gram prompt lookup, a self-draft of the target's first layers) and
policy, every token engine.LLM emits under speculation is argmax-consistent with
transformers' no-cache forward over prompt + output (tests/correctness/full_forward.py), and
the fraction of tokens identical to engine.LLM without speculation is reported (verifying
k + 1 rows changes matmul shapes, so ties could in principle break differently; the tests
require at least 99 %, and tiny fp32 models give 100 %). Tiny random checkpoints run in the
default suite; SmolLM2-135M (tests/real_model.py) is marked slow.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine import LLM, SamplingParams
from engine.models.self_draft import build_self_draft
from tests.correctness.full_forward import check_argmax_consistent
from tests.correctness.hf_ref import hf_model, random_prompts
from tests.real_model import PROMPTS as CHAT_PROMPTS

BS = 16
MIN_IDENTICAL = 0.99


def identical(ref: Sequence[list[int]], got: Sequence[list[int]]) -> tuple[int, int]:
    """Tokens before each output first differs from its reference, and the reference tokens."""
    same = sum(
        next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g)))
        for r, g in zip(ref, got, strict=True)
    )
    return same, sum(len(r) for r in ref)


def run_and_check(model: str, hf, prompts, params, spec: dict, label: str, **options) -> float:
    plain = [o.token_ids for o in LLM(model, skip_tokenizer_init=True, **options).generate(prompts, params)]
    llm = LLM(model, skip_tokenizer_init=True, speculative_config=spec, **options)
    outs = [o.token_ids for o in llm.generate(prompts, params)]
    same, total = identical(plain, outs)
    st = llm.engine.spec_stats()
    print(
        f"{label}: identical to no speculation {same}/{total}; acceptance {st.acceptance_rate:.3f} "
        f"({st.accepted_tokens}/{st.proposed_tokens}), mean accepted length {st.mean_accepted_length:.2f}"
    )
    assert st.proposed_tokens > 0
    assert same >= MIN_IDENTICAL * total
    check_argmax_consistent(hf, prompts, outs, [f"{label} prompt {i}" for i in range(len(prompts))])
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    return same / total


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def tiny_draft(tiny, tmp_path_factory):
    return build_self_draft(tiny, 2, str(tmp_path_factory.mktemp("spec_vs_hf") / "d2"))


TINY_PROMPTS = random_prompts(7, (3, 9, 17, 31)) + [[5, 6, 7, 8] * 5, [300, 301] * 9]
TINY_PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 4, "policy": "fixed", "prompt_lookup_min": 1},
        {"method": "ngram", "num_speculative_tokens": 4},
        {"method": "draft_model", "num_speculative_tokens": 3, "policy": "fixed"},
        {"method": "draft_model", "num_speculative_tokens": 3},
    ],
    ids=["ngram-fixed", "ngram-smartspec", "draft-fixed", "draft-smartspec"],
)
def test_tiny_greedy_speculation_is_argmax_consistent(tiny, tiny_draft, spec):
    spec = dict(spec)
    if spec["method"] == "draft_model":
        spec["model"] = tiny_draft
    run_and_check(tiny, hf_model(tiny), TINY_PROMPTS, TINY_PARAMS, spec, "tiny", num_blocks=256, block_size=BS)


# ------------------------------------------------------------------- SmolLM2-135M (slow)

QUOTE = (
    "Repeat the following text exactly: The quick brown fox jumps over the lazy dog. "
    "A journey of a thousand miles begins with a single step."
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_smollm2_greedy_speculation_is_argmax_consistent(
    smollm2_dir, hf_model, hf_tokenizer, chat_prompts, tmp_path_factory, method
):
    def chat(text: str) -> list[int]:
        rendered = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return hf_tokenizer(rendered, add_special_tokens=False).input_ids

    prompts = [*chat_prompts[:3], chat(QUOTE)]
    spec: dict = {"method": method, "num_speculative_tokens": 4, "policy": "fixed"}
    if method == "draft_model":
        spec["model"] = build_self_draft(smollm2_dir, 24, str(tmp_path_factory.mktemp("smollm2_draft") / "d24"))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    labels = [*CHAT_PROMPTS[:3], "quote"]
    assert len(labels) == len(prompts)
    run_and_check(smollm2_dir, hf_model, prompts, params, spec, f"smollm2 {method}", num_blocks=256)
