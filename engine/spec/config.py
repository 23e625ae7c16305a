"""SpeculativeConfig: what to speculate with, how far, and under which policy.

Built once, frozen, validated in ``__post_init__``; every error names the field
(``speculative_config.<field>``). ``SpeculativeConfig.from_dict`` takes vLLM's
``speculative_config`` keys::

    {"method": "ngram" | "draft_model", "model": DIR, "num_speculative_tokens": K,
     "policy": "smartspec" | "fixed", "prompt_lookup_min": N, "prompt_lookup_max": N}

As in vLLM: ``method`` may be left out when ``model`` says it (``"ngram"`` -> the n-gram
method, a directory -> ``draft_model``); for ``ngram`` one prompt-lookup bound given alone
sets both, neither given uses the defaults below (vLLM's are 5 and 5; ours start at 2 so
short repeated phrases are found too, and the acceptance tracking of SmartSpec stops
speculating where they do not pay).

``check_draft_compatible(target, draft)`` is the start-up check of a draft checkpoint
against the target: same vocabulary size and, when both directories are given and hold a
tokenizer.json, the same token -> id map. A draft with another tokenizer would propose ids
that mean other text: never a silent fallback, always an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from engine.config import ModelConfig

METHODS = ("ngram", "draft_model")
POLICIES = ("smartspec", "fixed")

# Why 16: a request verifies k + 1 rows per step, so K bounds what one request adds to a
# step's token budget and the draft model's sequential forwards per step (k of them). The
# gain of the k-th draft token is a^k (a: per-token acceptance): even at a = 0.9 the 17th
# token would add 0.17 expected tokens for a full extra draft forward, and measured
# acceptance of real drafts is far lower. vLLM's rejection sampler caps at 128; nothing here
# needs that much, and a small cap keeps the policy's search (B x K candidates) cheap.
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_PROMPT_LOOKUP_MIN = 2
DEFAULT_PROMPT_LOOKUP_MAX = 5
MAX_PROMPT_LOOKUP = 64  # the n-gram proposer compares n positions per candidate match

# vLLM keys this engine knows but does not implement (a clear error, not "unknown key").
_UNSUPPORTED_VLLM_KEYS = frozenset(
    {
        "draft_tensor_parallel_size",
        "quantization",
        "max_model_len",
        "revision",
        "code_revision",
        "disable_by_batch_size",
        "disable_mqa_scorer",
        "disable_logprobs",
        "disable_log_stats",
        "speculative_token_tree",
        "enforce_eager",
        "parallel_drafting",
    }
)


def _field_error(name: str, message: str) -> ValueError:
    return ValueError(f"speculative_config.{name} {message}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _field_error(name, f"must be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """One speculation setup, shared by every request of an engine.

    method: "ngram" (prompt lookup over prompt + output) or "draft_model" (``model``).
    num_speculative_tokens: K, the most draft tokens a request verifies in one step (1..16).
        With policy "smartspec" each request gets k in 0..K per step; "fixed" always K.
    model: the draft checkpoint (HF directory or .gguf) for "draft_model"; None for "ngram".
    policy: "smartspec" (goodput-maximising k per request) or "fixed".
    prompt_lookup_min / prompt_lookup_max: n-gram sizes tried, longest first ("ngram" only;
        None for "draft_model").
    acceptance_prior: SmartSpec's cold-start per-token acceptance estimate for this
        proposer, before any request was verified (0 < prior < 1).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    policy: str = "smartspec"
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    acceptance_prior: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _field_error("method", f"must be one of {list(METHODS)}, got {self.method!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        if self.policy not in POLICIES:
            raise _field_error("policy", f"must be one of {list(POLICIES)}, got {self.policy!r}")
        prior = self.acceptance_prior
        if isinstance(prior, bool) or not isinstance(prior, int | float) or not 0.0 < prior < 1.0:
            raise _field_error("acceptance_prior", f"must be a number in (0, 1), got {prior!r}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise _field_error(
                    "model", "must name the draft checkpoint directory (or .gguf) for method draft_model"
                )
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise _field_error(name, "applies to method ngram only")
            return
        if self.model is not None:
            raise _field_error("model", f"must be unset for method ngram, got {self.model!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo, hi = DEFAULT_PROMPT_LOOKUP_MIN, DEFAULT_PROMPT_LOOKUP_MAX
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        _check_int("prompt_lookup_min", lo, 1, MAX_PROMPT_LOOKUP)
        _check_int("prompt_lookup_max", hi, 1, MAX_PROMPT_LOOKUP)
        if lo > hi:
            raise _field_error("prompt_lookup_min", f"({lo}) must be <= prompt_lookup_max ({hi})")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM-style ``speculative_config`` keys (module docstring); unknown keys are errors."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(d).__name__}")
        known = {
            "method",
            "model",
            "num_speculative_tokens",
            "policy",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "acceptance_prior",
        }
        unsupported = sorted(set(d) & _UNSUPPORTED_VLLM_KEYS)
        if unsupported:
            raise ValueError(f"speculative_config keys {unsupported} are vLLM options this engine does not implement")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        if "num_speculative_tokens" not in d:
            raise _field_error("num_speculative_tokens", "is required")
        method, model = d.get("method"), d.get("model")
        if method is None:
            if model is None:
                raise _field_error("method", f"is required (one of {list(METHODS)}) when no model is given")
            method = "ngram" if model in ("ngram", "[ngram]") else "draft_model"
        if method == "ngram" and model in ("ngram", "[ngram]"):
            model = None  # vLLM spells the n-gram method as a model name too
        fields = {k: v for k, v in d.items() if k not in ("method", "model")}
        return SpeculativeConfig(method=method, model=model, **fields)

    @staticmethod
    def from_json(text: str) -> SpeculativeConfig:
        """``--speculative-config JSON``; a JSON syntax error names the option."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        return SpeculativeConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in ``from_dict`` form (None fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


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
