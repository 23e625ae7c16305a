"""Shared helpers of the correctness suite: Hugging Face greedy references and engine runs.

The reference is ``transformers`` ``generate`` on the same checkpoint in fp32, greedy, one
prompt at a time (no batching, no padding), with ``generation_config.eos_token_id = None``
so HF neither stops at nor suppresses EOS (the engine runs with ``ignore_eos=True``).
References are cached per (checkpoint, prompt, length) for the whole session.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from engine import LLM, SamplingParams

VOCAB = 512  # tiny checkpoints' vocab_size (engine/models/tiny.py); ids 0-2 are special
MIXED_LENGTHS = (3, 9, 16, 17, 31, 48, 70)  # < 1 page, exactly one page, page + 1, several pages

_models: dict[str, Any] = {}
_refs: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


def random_prompts(
    seed: int, lengths: tuple[int, ...] = MIXED_LENGTHS, prefix: list[int] | None = None
) -> list[list[int]]:
    """Random token-id prompts of ``lengths`` (ids 3..VOCAB-1), each after an optional shared prefix."""
    rng = random.Random(seed)
    head = list(prefix or [])
    return [head + [rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def hf_model(ckpt: str) -> Any:
    model = _models.get(ckpt)
    if model is None:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # never stop at / suppress EOS
        model.generation_config.pad_token_id = 0  # silences the "no pad token" notice
        _models[ckpt] = model
    return model


def hf_greedy(ckpt: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one unpadded prompt by transformers (cached)."""
    key = (ckpt, tuple(prompt), max_new_tokens)
    if key not in _refs:
        model = hf_model(ckpt)
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
        new = out[0, len(prompt) :].tolist()
        assert len(new) == max_new_tokens, f"HF stopped early after {len(new)} tokens: EOS handling is wrong"
        _refs[key] = new
    return _refs[key]


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def assert_pool_full(llm: LLM) -> None:
    """Every KV block is back in the free list and no request is left in the scheduler."""
    pool = llm.engine.pool
    assert pool.num_free == pool.num_blocks, f"{pool.num_blocks - pool.num_free} KV blocks leaked"
    assert all(rc == 0 for rc in pool.ref_counts)
    assert llm.engine.scheduler.num_unfinished == 0
    assert not llm.engine.kv.blocks


def assert_matches_hf(ckpt: str, llm: LLM, prompts: list[list[int]], max_tokens: int) -> list:
    """Generate greedily with ``llm`` and require token-identical output to HF per prompt."""
    outs = llm.generate(prompts, greedy_params(max_tokens))
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        ref = hf_greedy(ckpt, prompt, max_tokens)
        assert out.token_ids == ref, _diff(i, prompt, out.token_ids, ref)
        assert out.finish_reason == "length"
    assert_pool_full(llm)
    return outs


def _diff(i: int, prompt: list[int], got: list[int], ref: list[int]) -> str:
    first = next((j for j, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref)))
    return (
        f"prompt #{i} (len {len(prompt)}) diverges from HF at generated token {first}: "
        f"engine {got[first : first + 6]} vs HF {ref[first : first + 6]} (lengths {len(got)}/{len(ref)})"
    )


class StepLog:
    """Records what every engine step scheduled (spy on ``Scheduler.schedule``)."""

    def __init__(self, llm: LLM):
        self.outputs: list = []  # SchedulerOutput per step
        self.max_ref_count = 0  # highest block ref count seen right after scheduling
        self._llm = llm
        scheduler = llm.engine.scheduler
        inner = scheduler.schedule

        def schedule():
            out = inner()
            self.outputs.append(out)
            self.max_ref_count = max(self.max_ref_count, max(llm.engine.pool.ref_counts))
            return out

        scheduler.schedule = schedule  # instance attribute shadows the method

    @property
    def max_tokens_per_step(self) -> int:
        return max(o.num_tokens for o in self.outputs)

    @property
    def max_seqs_per_step(self) -> int:
        return max(len(o.scheduled) for o in self.outputs)

    @property
    def num_partial_prefills(self) -> int:
        """Scheduled prompt chunks that did not reach the end of the prompt (no sampling)."""
        return sum(1 for o in self.outputs for s in o.scheduled if not s.sample)

    @property
    def num_mixed_steps(self) -> int:
        """Steps that batched a decode row together with a multi-token prompt chunk."""
        return sum(
            1
            for o in self.outputs
            if any(s.num_tokens == 1 for s in o.scheduled) and any(s.num_tokens > 1 for s in o.scheduled)
        )
