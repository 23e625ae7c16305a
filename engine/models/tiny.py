"""Tiny random-weight Hugging Face checkpoints for tests, demos and benchmarks.

``build_tiny_checkpoint(out_dir, family=...)`` writes a directory that looks like a real
Hugging Face model repository:

    config.json, generation_config.json     transformers config of the family (fp32)
    model.safetensors                        or model-0000k-of-0000n.safetensors + index json
    tokenizer.json                           byte-level BPE trained offline on ``_CORPUS``
    tokenizer_config.json                    special tokens + a Jinja chat template
    special_tokens_map.json
    splitserve_tiny.json                     the build arguments (cache stamp, written last)

Invariants:
- The tokenizer has exactly ``config.vocab_size`` tokens, so every id the model can emit
  decodes. Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``; ``eos_token_id`` is ``</s>``.
  Encoding adds no special tokens (no automatic ``<s>``), so decode(encode(text)) == text.
- Weights are a pure function of (family, seed, overrides) for a given transformers version:
  every parameter is drawn from a private ``torch.Generator``; the global RNG is untouched.
  Matrices and biases ~ N(0, initializer_range), norm weights ~ 1 + N(0, initializer_range).
  The default ``initializer_range`` is 0.1 (not HF's 0.02) so greedy logits are well separated.
- A directory whose stamp matches the requested arguments is reused as is; anything else
  is rebuilt after deleting the checkpoint files this module writes (and nothing else).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STAMP_FILE = "splitserve_tiny.json"
_STAMP_FORMAT = 1  # bump when the output of a given set of arguments changes

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2

# Renders [{"role": "user", "content": "hi"}] as "<|user|>\nhi\n" turns, then "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Shared by every family; per-family defaults and the caller's overrides win over these.
_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE: dict[str, Any] = {"num_experts_per_tok": 2}
_QWEN_MOE: dict[str, Any] = {
    **_MOE,
    "num_experts": 4,
    "moe_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}

# family -> (transformers config class name, architecture, defaults over _COMMON)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        },
    ),
    # Qwen2 always has q/k/v biases.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": None}),
    # Qwen3: RMSNorm on q and k; head_dim (32) deliberately != hidden_size / num_heads (16).
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"head_dim": 32, "use_sliding_window": False, "sliding_window": None},
    ),
    # Full attention by default; pass sliding_window=N for a windowed Mistral.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_MOE, "num_local_experts": 4, "sliding_window": None}),
    # Qwen2-MoE: routed experts plus a gated shared expert; top-k weights not renormalised.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **_QWEN_MOE,
            "shared_expert_intermediate_size": 128,
            "norm_topk_prob": False,
            "use_sliding_window": False,
            "sliding_window": None,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_QWEN_MOE, "head_dim": 32, "norm_topk_prob": True, "use_sliding_window": False, "sliding_window": None},
    ),
}
TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

# Splits text into words, single digits, punctuation runs and whitespace runs before BPE.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Legacy config keys that transformers still accepts although they are not __init__ parameters.
_LEGACY_CONFIG_KEYS = frozenset({"rope_scaling", "rope_theta"})

# Every file a build may write; only these are deleted before a rebuild.
_OWNED_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        STAMP_FILE,
    }
)


def build_tiny_checkpoint(
    out_dir: str | os.PathLike[str],
    family: str = "llama",
    seed: int = 0,
    sharded: bool = False,
    **overrides: Any,
) -> str:
    """Write (or reuse) a random-weight checkpoint + tokenizer in ``out_dir``; return its path.

    ``overrides`` go into the transformers config constructor after the tiny defaults, e.g.
    ``num_key_value_heads=1, head_dim=48, tie_word_embeddings=True, num_experts_per_tok=1``.
    ``sharded=True`` saves several safetensors shards plus ``model.safetensors.index.json``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {list(FAMILIES)}")
    import transformers  # its version is part of the stamp: parameter order decides the weights

    out = os.path.abspath(os.fspath(out_dir))
    stamp = _normalise(
        {
            "format": _STAMP_FORMAT,
            "transformers": transformers.__version__,
            "family": family,
            "seed": seed,
            "sharded": sharded,
            "overrides": overrides,
        }
    )
    if _read_stamp(out) == stamp:
        return out

    config = make_config(family, **overrides)
    os.makedirs(out, exist_ok=True)
    _remove_owned_files(out)
    _save_model(config, out, seed=seed, sharded=sharded)
    save_tiny_tokenizer(out, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings)
    with open(os.path.join(out, STAMP_FILE), "w") as f:  # last: marks the directory complete
        json.dump(stamp, f, indent=2, sort_keys=True)
    return out


def make_config(family: str, **overrides: Any) -> Any:
    """The transformers ``PretrainedConfig`` of a tiny ``family`` model with ``overrides`` applied."""
    import transformers

    class_name, architecture, defaults = FAMILIES[family]
    config_cls = getattr(transformers, class_name)
    accepted = set(inspect.signature(config_cls.__init__).parameters) | _LEGACY_CONFIG_KEYS
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        # transformers would silently store unknown keys; a typo must not pass unnoticed
        raise TypeError(f"{class_name} does not accept {unknown}")
    kwargs = {**_COMMON, **defaults, **overrides, "architectures": [architecture], "dtype": "float32"}
    if kwargs["vocab_size"] < _min_vocab_size():
        raise ValueError(f"vocab_size {kwargs['vocab_size']} < {_min_vocab_size()} (256 bytes + special tokens)")
    return config_cls(**kwargs)


def save_tiny_tokenizer(out_dir: str, vocab_size: int, model_max_length: int = 2048) -> None:
    """Train a byte-level BPE tokenizer of exactly ``vocab_size`` tokens and save it HF-style."""
    tokenizer = train_tiny_tokenizer(vocab_size)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def train_tiny_tokenizer(vocab_size: int) -> Any:
    """A ``tokenizers.Tokenizer`` with exactly ``vocab_size`` tokens (deterministic, offline)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < _min_vocab_size():
        raise ValueError(f"vocab_size {vocab_size} < {_min_vocab_size()} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    # The pipeline transformers hard-codes for Qwen2Tokenizer (which AutoTokenizer forces on
    # qwen2/qwen3 configs, ignoring tokenizer.json's own pipeline): with the same pipeline for
    # every family, tokenizer.json and AutoTokenizer produce the same ids.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    # The corpus runs out of merges for large vocabularies: pad with special filler tokens.
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([AddedToken(f"<extra_{i}>", special=True) for i in range(missing)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected {vocab_size}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"{token} has id {tokenizer.token_to_id(token)}, expected {expected_id}")
    return tokenizer


def _save_model(config: Any, out: str, seed: int, sharded: bool) -> None:
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):  # from_config's own init must not move the caller's RNG
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed=seed, std=config.initializer_range)
    max_shard_size: int | str = "50GB"
    if sharded:
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard_size = max(1, total_bytes // 4)  # ~4+ shards (a tensor is never split)
    with _quiet_transformers():
        model.save_pretrained(out, max_shard_size=max_shard_size)


def _init_weights(model: Any, seed: int, std: float) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are yielded once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm = param.ndim == 1 and "norm" in name
            param.copy_(1.0 + std * noise if is_norm else std * noise)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _read_stamp(out: str) -> dict[str, Any] | None:
    path = os.path.join(out, STAMP_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(out, "config.json"))):
        return None
    with open(path) as f:
        return json.load(f)


def _remove_owned_files(out: str) -> None:
    for name in os.listdir(out):
        if name in _OWNED_FILES or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(out, name))


def _normalise(value: dict[str, Any]) -> dict[str, Any]:
    """The JSON round trip of ``value`` (tuples become lists), so stamps compare equal on reload."""
    return json.loads(json.dumps(value, sort_keys=True))


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _min_vocab_size() -> int:
    return 256 + len(SPECIAL_TOKENS)


# Training text for the tokenizer: plain English prose, split into paragraphs on blank lines.
_CORPUS = """\
The harbour town woke slowly on winter mornings. Fishing boats rocked against the stone quay,
gulls argued over scraps, and the baker on the corner opened his shutters before the sun was up.
Children walked to school along the sea wall, counting the ships that waited outside the bay,
while their parents drank coffee and talked about the weather, the prices at the market and the
news from the capital.

Learning a language is a long conversation with yourself. At first every sentence is a puzzle:
you translate each word, check the grammar twice and still feel unsure. After a few months the
pieces begin to fit together. You read a newspaper without a dictionary, you follow a film, and
one day you notice that you have been thinking in the new language without trying.

The old library kept its books on tall wooden shelves that reached the ceiling. A narrow ladder
moved along a brass rail, and the librarian climbed it with surprising speed whenever someone
asked for a volume from the top row. Visitors came to read history, poetry and science, but many
of them simply enjoyed the quiet, the smell of paper and the light from the high windows.

Good software is built in small steps. Engineers write a simple version first, measure how it
behaves, and only then make it faster or more general. Each change is tested, reviewed and
explained, so that the people who read the code next year can understand why it works. When
something breaks, a clear error message saves hours of searching.

Rain moved across the hills in the afternoon. The farmers brought the sheep down from the high
fields, closed the gates and carried the last of the hay into the barn. In the evening the clouds
opened again, the valley turned gold, and everyone stood outside for a moment to watch the light
fade behind the mountains before they went in for supper.

Questions and answers: What time is it? It is half past seven. Where are you going? I am going
to the station to meet my sister, who is arriving on the evening train from the north. How long
will you stay? We will stay for three days, visit the museum, walk by the river and eat dinner
at the small restaurant near the bridge. Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear too.
"""
