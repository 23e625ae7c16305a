"""The offline LLM API on text: string prompts, stop strings, stop token ids, EOS, max_tokens,
logprobs and seeded sampling, with HF transformers as the reference where one exists."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.correctness.hf_ref import assert_pool_full, greedy_params, hf_greedy, hf_model

PROMPTS = [
    "The harbour town woke slowly on winter mornings.",
    "Questions and answers: What time is it?",
    "Good software",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> str:
    return tiny_checkpoint("qwen2")


@pytest.fixture
def llm(ckpt) -> LLM:
    return LLM(model=ckpt, block_size=8, num_blocks=64, attention_backend="sdpa")


@pytest.fixture(scope="module")
def full(ckpt):
    """Reference greedy outputs (no stop conditions) of PROMPTS, from a separate engine."""
    llm = LLM(model=ckpt, block_size=8, num_blocks=64, attention_backend="sdpa")
    return llm.generate(PROMPTS, greedy_params(MAX_NEW))


def test_string_prompts_match_hf_and_decode(ckpt, llm, full):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    for prompt, out in zip(PROMPTS, full, strict=True):
        ids = hf_tok(prompt)["input_ids"]
        assert out.prompt_token_ids == ids == llm.tokenizer.encode(prompt)
        assert out.token_ids == hf_greedy(ckpt, ids, MAX_NEW)
        assert out.text == hf_tok.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == "length" and len(out.token_ids) == MAX_NEW
    single = llm.generate(PROMPTS[0], greedy_params(MAX_NEW))  # a bare string works too
    assert len(single) == 1 and single[0].token_ids == full[0].token_ids
    assert_pool_full(llm)


def _stop_candidate(text: str) -> str:
    """A 2-character substring of the middle of ``text`` with no replacement character."""
    for start in range(len(text) // 3, len(text) - 2):
        s = text[start : start + 2]
        if "\ufffd" not in s and s.strip():
            return s
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_cuts_text(llm, full):
    stops = [_stop_candidate(o.text) for o in full]
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, stop=(s,)) for s in stops]
    outs = llm.generate(PROMPTS, params)
    for ref, out, stop in zip(full, outs, stops, strict=True):
        assert out.finish_reason == "stop"
        assert stop not in out.text
        assert out.text == ref.text[: ref.text.index(stop)]
        n = len(out.token_ids)
        assert out.token_ids == ref.token_ids[:n] and n < MAX_NEW
        decoded = llm.tokenizer.decode(out.token_ids)
        assert stop in decoded and stop not in llm.tokenizer.decode(out.token_ids[:-1])
    assert_pool_full(llm)


def test_stop_token_ids(llm, full):
    ref = full[1].token_ids
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_tok,))
    out = llm.generate(PROMPTS[1], params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[: first + 1]  # the stop token is the last one returned


def test_eos_stops_unless_ignored(llm, full):
    ref = full[0].token_ids
    eos = ref[4]
    first = ref.index(eos)
    results = {}
    for ignore in (False, True):
        req = llm.make_request(PROMPTS[0], SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=ignore))
        req.eos_token_ids = (eos,)  # pretend the model's EOS is a token it generates
        llm.engine.add_request(req)
        while not req.is_finished:
            llm.engine.step()
        results[ignore] = llm.output(req)
    assert results[False].finish_reason == "stop" and results[False].token_ids == ref[: first + 1]
    assert results[True].finish_reason == "length" and results[True].token_ids == ref


def test_max_tokens_gives_length(llm, full):
    outs = llm.generate(PROMPTS, [greedy_params(n) for n in (1, 5, 9)])
    for out, ref, n in zip(outs, full, (1, 5, 9), strict=True):
        assert out.finish_reason == "length" and out.token_ids == ref.token_ids[:n]


def test_logprobs_match_hf_scores(ckpt, llm, full):
    n_top = 3
    prompt = llm.tokenizer.encode(PROMPTS[2])
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=n_top))[0]
    model = hf_model(ckpt)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert len(out.logprobs) == 8
    for step, (lp, logits) in enumerate(zip(out.logprobs, gen.logits, strict=True)):
        ref = torch.log_softmax(logits[0].double(), -1)
        assert lp.token_id == out.token_ids[step] == int(ref.argmax())
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-4)
        top = torch.topk(ref, n_top)
        assert list(lp.top) == top.indices.tolist()
        assert list(lp.top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_seeded_sampling_is_reproducible_across_batches(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], p)[0].token_ids
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, p, others])[1].token_ids
    assert alone == batched
    other_seed = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_invalid_prompt_rejected_without_leaving_requests_behind(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 6, 7], [5, 512]], greedy_params(2))
    assert_pool_full(llm)  # the valid first prompt was withdrawn too
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 3000], greedy_params(2))
    assert llm.generate([[5, 6, 7]], greedy_params(2))[0].finish_reason == "length"
    assert_pool_full(llm)
