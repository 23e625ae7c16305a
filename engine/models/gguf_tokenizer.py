"""A Hugging Face ``tokenizer.json`` rebuilt from a GGUF file's ``tokenizer.*`` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the BPE merges, each token's
type and the special token ids as metadata, and names the pre-tokenizer (how text is split
before BPE) by a string, ``tokenizer.ggml.pre``. This module turns those back into the
``tokenizers`` pipeline that produced them.

Supported: byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with one of the
pre-tokenizers in ``PRE_TOKENIZERS``. Anything else raises ``UnsupportedGGUFError`` naming it;
a guessed pre-tokenizer would silently split some texts differently from the model's training.

Token types (llama.cpp ``llama_token_type``): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control and unknown tokens become special added tokens (matched whole, dropped
by ``decode(skip_special_tokens=True)``); user-defined ones become non-special added tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import UnsupportedModelError


class UnsupportedGGUFError(UnsupportedModelError):
    """The GGUF's architecture, tensor type, tokenizer or one of its options is not implemented."""


TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

# GPT-2's split: contractions, letter runs, digit runs, other-symbol runs, whitespace
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3: case-insensitive contractions, numbers in groups of up to three digits
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: like Llama 3 but single digits
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one ``tokenizer.ggml.pre`` value splits text, in the original tokenizer.json's terms."""

    build: Callable[[], Any]  # -> tokenizers.pre_tokenizers.PreTokenizer
    nfc: bool = False  # NFC-normalise before splitting (Qwen2's tokenizer.json does)
    # emit a whole pre-token that is itself in the vocabulary without applying merges
    # (Llama 3's tokenizer.json sets BPE ``ignore_merges``; llama.cpp does the same for it)
    ignore_merges: bool = False


def _byte_level(regex: str | None) -> Any:
    """Split by ``regex`` (None: GPT-2's split built into ByteLevel), then map bytes to symbols."""
    from tokenizers import Regex, pre_tokenizers

    if regex is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2() -> Any:
    """SmolLM / StarCoder: every digit alone, then GPT-2's split (llama.cpp's SMOLLM pre-type)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level(None)],
    )


# tokenizer.ggml.pre -> pipeline; names as llama.cpp's convert_hf_to_gguf.py writes them
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "gpt-2": PreTokenizerSpec(lambda: _byte_level(None)),
    "smollm": PreTokenizerSpec(_digits_then_gpt2),
    "llama-bpe": PreTokenizerSpec(lambda: _byte_level(_LLAMA3_SPLIT), ignore_merges=True),
    "qwen2": PreTokenizerSpec(lambda: _byte_level(_QWEN2_SPLIT), nfc=True),
}
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)


@dataclass(frozen=True)
class GGUFTokenizerSpec:
    """The ``tokenizer.*`` metadata of a GGUF file (ids index ``tokens``)."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (sentencepiece), ...
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]  # one per token; all TOKEN_NORMAL when the file has none
    merges: list[str]  # "left right", best first
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None  # end of turn (Llama 3's <|eot_id|>); generation stops there too
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def check_supported(self, source: str) -> None:
        """Raise UnsupportedGGUFError unless ``build_tokenizer`` reproduces this tokenizer."""
        if self.model not in SUPPORTED_TOKENIZER_MODELS:
            raise UnsupportedGGUFError(
                f"{source}: GGUF tokenizer model {self.model!r} is not supported "
                f"(supported: {list(SUPPORTED_TOKENIZER_MODELS)})"
            )
        if self.pre not in PRE_TOKENIZERS:
            raise UnsupportedGGUFError(
                f"{source}: GGUF pre-tokenizer {self.pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})"
            )
        if not self.merges:
            raise UnsupportedGGUFError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")
        if len(self.token_types) != len(self.tokens):
            raise UnsupportedGGUFError(f"{source}: {len(self.token_types)} token types for {len(self.tokens)} tokens")

    def special_ids(self) -> dict[str, int | None]:
        return {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def build_tokenizer(spec: GGUFTokenizerSpec) -> Any:
    """The ``tokenizers.Tokenizer`` the metadata describes (call ``spec.check_supported`` first)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pre = PRE_TOKENIZERS[spec.pre or ""]
    vocab = {token: i for i, token in enumerate(spec.tokens)}
    merges = []
    for merge in spec.merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise UnsupportedGGUFError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(spec.tokens, spec.token_types, strict=True)
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(spec.tokens, spec.token_types, strict=True)
        if kind == TOKEN_USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size() != len(spec.tokens):  # added tokens must reuse their vocabulary ids
        raise UnsupportedGGUFError(f"tokenizer has {tok.get_vocab_size()} tokens, the GGUF lists {len(spec.tokens)}")
    tok.post_processor = _post_processor(spec, processors)
    return tok


def _post_processor(spec: GGUFTokenizerSpec, processors: Any) -> Any:
    """BOS/EOS that ``encode(add_special_tokens=True)`` adds, as llama.cpp's add_bos/add_eos flags say."""
    if not (spec.add_bos or spec.add_eos):
        return processors.ByteLevel(trim_offsets=False)
    pieces: dict[str, int] = {}
    for flag, token_id, what in ((spec.add_bos, spec.bos_id, "bos"), (spec.add_eos, spec.eos_id, "eos")):
        if flag:
            if token_id is None:
                raise UnsupportedGGUFError(f"tokenizer.ggml.add_{what}_token is set but the file has no {what} id")
            pieces[what] = token_id
    bos = f"{spec.tokens[pieces['bos']]} " if "bos" in pieces else ""
    eos = f" {spec.tokens[pieces['eos']]}" if "eos" in pieces else ""
    return processors.TemplateProcessing(
        single=f"{bos}$A{eos}",
        pair=f"{bos}$A{eos} {bos}$B:1{eos}",
        special_tokens=[(spec.tokens[i], i) for i in sorted(set(pieces.values()))],
    )


def tokenizer_config(spec: GGUFTokenizerSpec, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for the rebuilt tokenizer (the chat template goes to chat_template.jinja)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.token(spec.bos_id),
        "eos_token": spec.token(spec.eos_id),
        "unk_token": spec.token(spec.unk_id),
        "pad_token": spec.token(spec.pad_id),
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
