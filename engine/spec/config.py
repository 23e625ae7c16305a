"""SpeculativeConfig (defined in engine/config.py, part of EngineConfig; re-exported here):
what to speculate with, how far, and under which policy.

Built once, frozen, validated in ``__post_init__``; every error names the field
(``speculative_config.<field>``). ``SpeculativeConfig.from_dict`` takes vLLM's
``speculative_config`` keys::

    {"method": "ngram" | "draft_model", "model": DIR, "num_speculative_tokens": K,
     "policy": "smartspec" | "fixed", "prompt_lookup_min": N, "prompt_lookup_max": N}

As in vLLM: ``method`` may be left out when ``model`` says it (``"ngram"`` -> the n-gram
method, a directory -> ``draft_model``); for ``ngram`` one prompt-lookup bound given alone
sets both, neither given uses DEFAULT_PROMPT_LOOKUP_MIN / _MAX (vLLM's are 5 and 5; ours start at 2 so
short repeated phrases are found too, and the acceptance tracking of SmartSpec stops
speculating where they do not pay).

``check_draft_compatible(target, draft)`` is the start-up check of a draft checkpoint
against the target: same vocabulary size and, when both directories are given and hold a
tokenizer.json, the same token -> id map. A draft with another tokenizer would propose ids
that mean other text: never a silent fallback, always an error.
"""

from __future__ import annotations

import os

from engine.config import (
    DEFAULT_PROMPT_LOOKUP_MAX,
    DEFAULT_PROMPT_LOOKUP_MIN,
    MAX_PROMPT_LOOKUP,
    MAX_SPECULATIVE_TOKENS,
    METHODS,
    POLICIES,
    ModelConfig,
    SpeculativeConfig,
)

__all__ = [
    "DEFAULT_PROMPT_LOOKUP_MAX",
    "DEFAULT_PROMPT_LOOKUP_MIN",
    "MAX_PROMPT_LOOKUP",
    "MAX_SPECULATIVE_TOKENS",
    "METHODS",
    "POLICIES",
    "DraftIncompatibleError",
    "SpeculativeConfig",
    "check_draft_compatible",
]


class DraftIncompatibleError(ValueError):
    """The draft checkpoint cannot propose tokens for this target (message names the field)."""


def check_draft_compatible(
    target: ModelConfig,
    draft: ModelConfig,
    target_path: str | None = None,
    draft_path: str | None = None,
) -> None:
    """Raise DraftIncompatibleError when ``draft`` cannot serve as ``target``'s draft.

    The vocabulary sizes must be equal (proposed ids index the target's logits). With both
    model directories given, their tokenizer.json vocabularies (token -> id) must be equal
    too; a directory without tokenizer.json (token-id serving) is checked by size only.
    """
    if draft.vocab_size != target.vocab_size:
        raise DraftIncompatibleError(
            f"draft vocab_size {draft.vocab_size} differs from the target's {target.vocab_size}: "
            "a draft must share the target's tokenizer and vocabulary"
        )
    if target_path is None or draft_path is None:
        return
    tv, dv = _tokenizer_vocab(target_path), _tokenizer_vocab(draft_path)
    if tv is None or dv is None or tv == dv:
        return
    diff = sorted(set(tv.items()) ^ set(dv.items()))[:3]
    raise DraftIncompatibleError(
        f"draft tokenizer vocabulary differs from the target's ({len(dv)} vs {len(tv)} tokens; "
        f"first differences (token, id): {diff}): a draft must share the target's tokenizer"
    )


def _tokenizer_vocab(path: str) -> dict[str, int] | None:
    from engine.models.gguf import resolve_model_path

    file = os.path.join(resolve_model_path(path, progress=False), "tokenizer.json")
    if not os.path.exists(file):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file).get_vocab(with_added_tokens=True)
