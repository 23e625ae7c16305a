"""The reference check of the real-model tests: greedy output against transformers' full forward.

For each (prompt, generated tokens) pair, one no-cache forward of transformers over
prompt + generated gives the logits at every generated position; each generated token must
be the argmax there, or within ``tie`` logits of it (a tie the engine may break the other
way). Cached ``generate`` is not the reference: on SmolLM2 it departs from its own full
forward within a few dozen tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TIE = 1e-3


@dataclass
class ArgmaxAgreement:
    exact: int = 0  # generated tokens equal to the reference argmax
    ties: int = 0  # generated tokens within ``tie`` logits of it

    @property
    def total(self) -> int:
        return self.exact + self.ties


def check_argmax_consistent(
    hf_model, prompts: Sequence[list[int]], outputs: Sequence[list[int]], labels: Sequence[str], tie: float = TIE
) -> ArgmaxAgreement:
    """Assert every generated token is argmax-consistent with ``hf_model``'s full forward."""
    agreement = ArgmaxAgreement()
    for prompt, generated, label in zip(prompts, outputs, labels, strict=True):
        assert generated, f"{label}: nothing generated"
        full = torch.tensor([list(prompt) + list(generated)])
        with torch.inference_mode():
            logits = hf_model(full).logits[0, len(prompt) - 1 : -1]  # [len(generated), vocab]
        best = logits.argmax(-1)
        for pos, token in enumerate(generated):
            if token == best[pos].item():
                agreement.exact += 1
                continue
            gap = (logits[pos, best[pos]] - logits[pos, token]).item()
            assert gap <= tie, (
                f"{label}, generated token {pos}: {token} is {gap:.4g} logits below the reference argmax "
                f"{best[pos].item()}"
            )
            agreement.ties += 1
    return agreement
