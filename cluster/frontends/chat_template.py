"""Chat messages -> prompt text through the model's Jinja chat template (sandboxed).

Where the template comes from (``read_tokenizer_config(model_dir)``), in transformers' order
(``PreTrainedTokenizerBase.from_pretrained`` / ``_from_pretrained`` in
transformers/tokenization_utils_base.py, transformers 5.x as pinned in requirements.lock):

1. ``chat_template.jinja`` (the "default" template; what transformers writes since 4.43 and
   what a converted GGUF directory holds, engine/models/gguf.py) together with
   ``additional_chat_templates/<name>.jinja`` (named templates). If any of these files exists,
   they replace the ``chat_template`` of ``tokenizer_config.json`` entirely, even when only
   named templates exist and none is "default" (transformers then refuses to render, and so
   does ``render`` here).
2. ``tokenizer_config.json``'s ``chat_template``: one string, or a list of
   ``{"name", "template"}`` entries.
3. ``chat_template.json`` (``{"chat_template": "..."}``): transformers reads it only for
   multimodal processors (``ProcessorMixin.get_processor_dict`` in processing_utils.py); a
   text-only model has no processor, so ``AutoTokenizer`` and ``AutoProcessor`` ignore it. It
   is used here only when 1 and 2 give no template, where transformers would have none: every
   directory that transformers renders is rendered identically.

GGUF files: their ``tokenizer.chat_template`` metadata is written to ``chat_template.jinja`` of
the converted directory, so it takes path 1.

Named templates are chosen like ``PreTrainedTokenizerBase.get_chat_template``: "tool_use" when
``tools`` are passed and the model has it, else "default".

Rendering matches transformers' ``apply_chat_template`` (``render_jinja_template`` in
transformers/utils/chat_template_utils.py), so a prompt built here tokenizes to the same ids:
an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks`` and loop controls,
``tojson`` without HTML escaping, the ``raise_exception`` and ``strftime_now`` globals, and the
tokenizer's special tokens (``bos_token``, ``eos_token``, ..., and model-specific ``*_token``
entries) as variables. The rendered text already holds whatever special tokens the template
writes, so callers tokenize it with ``add_special_tokens=False``.

The sandbox keeps a template (a file from a model repository) from reaching Python
internals; user messages are data, never template source.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers.utils.hub.CHAT_TEMPLATE_FILE
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers.utils.hub.CHAT_TEMPLATE_DIR
LEGACY_CHAT_TEMPLATE_JSON = "chat_template.json"  # transformers.utils.hub.LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or rejected their shape)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_tokenizer_config(model_dir: str) -> dict[str, Any]:
    """``tokenizer_config.json`` of ``model_dir`` with what transformers merges into it on load.

    The result is the tokenizer's init configuration as transformers' ``_from_pretrained``
    assembles it, as far as chat templates see it: ``chat_template`` replaced by the template
    files (module docstring, order 1-3: one string, or ``{name: source}`` for several), and the
    named special tokens of a legacy ``special_tokens_map.json`` merged in (transformers does
    that only when the config has no ``added_tokens_decoder``). ``{}`` for a directory with
    none of these files.
    """
    config_file = os.path.join(model_dir, TOKENIZER_CONFIG_FILE)
    config: dict[str, Any] = {}
    if os.path.isfile(config_file):
        data = _read_json(config_file)
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: must hold a JSON object, got {type(data).__name__}")
        config = dict(data)
    map_file = os.path.join(model_dir, SPECIAL_TOKENS_MAP_FILE)
    if "added_tokens_decoder" not in config and os.path.isfile(map_file):
        special = _read_json(map_file)
        if isinstance(special, dict):
            config.update({k: v for k, v in special.items() if k in _SPECIAL_TOKENS})

    templates: dict[str, str] = {}
    default_file = os.path.join(model_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(default_file):
        templates["default"] = _read_text(default_file)
    named_dir = os.path.join(model_dir, CHAT_TEMPLATE_DIR)
    if os.path.isdir(named_dir):
        for name in sorted(os.listdir(named_dir)):
            if name.endswith(".jinja"):
                templates[name.removesuffix(".jinja")] = _read_text(os.path.join(named_dir, name))
    if templates:  # the files replace the config's template, as in transformers' _from_pretrained
        config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
    elif not config.get("chat_template"):
        legacy_file = os.path.join(model_dir, LEGACY_CHAT_TEMPLATE_JSON)
        if os.path.isfile(legacy_file):
            legacy = _read_json(legacy_file)
            if not isinstance(legacy, dict) or not isinstance(legacy.get("chat_template"), str):
                raise ValueError(f'{legacy_file}: must hold {{"chat_template": "<jinja source>"}}')
            config["chat_template"] = legacy["chat_template"]
    return config


def special_tokens_of(config: dict[str, Any]) -> dict[str, str]:
    """Template variables for the special tokens of a tokenizer config (transformers'
    ``special_tokens_map``): the named ones, plus model-specific ``*_token`` strings and the
    entries of an ``extra_special_tokens`` mapping."""
    tokens = {name: text for name in _SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
    for key, value in config.items():
        if key not in tokens and key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({k: v for k, v in extra.items() if isinstance(v, str)})
    return tokens


class ChatTemplate:
    """Compiled chat template(s) of one model; ``render`` is pure (no state between calls).

    ``source``: one Jinja source (the default template) or ``{name: source}`` for named
    templates ("default", "tool_use", ...).
    """

    def __init__(self, source: str | dict[str, str], special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], autoescape=False
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.sources = {"default": source} if isinstance(source, str) else dict(source)
        self.special_tokens = dict(special_tokens or {})
        # a syntax error fails here, at startup
        self._templates = {name: env.from_string(text) for name, text in self.sources.items()}

    @property
    def source(self) -> str | None:
        """The default template's source (None when only named templates exist)."""
        return self.sources.get("default")

    @staticmethod
    def from_tokenizer_config(config: dict[str, Any]) -> ChatTemplate | None:
        """The template(s) of a tokenizer config dict; None when it has none.

        ``chat_template`` may be a string, a list of ``{"name", "template"}`` entries (as
        tokenizer_config.json stores several) or ``{name: source}`` (``read_tokenizer_config``).
        """
        source = config.get("chat_template")
        if isinstance(source, list):
            source = {t["name"]: t["template"] for t in source if isinstance(t, dict) and "name" in t}
        if isinstance(source, dict):
            source = {k: v for k, v in source.items() if isinstance(k, str) and isinstance(v, str) and v}
        if not source or not isinstance(source, str | dict):
            return None
        return ChatTemplate(source, special_tokens_of(config))

    @staticmethod
    def from_model_dir(model_dir: str) -> ChatTemplate | None:
        """The template of a model directory (module docstring: which file wins); None when it has none."""
        return ChatTemplate.from_tokenizer_config(read_tokenizer_config(model_dir))

    def _select(self, tools: Any) -> jinja2.Template:
        """transformers' get_chat_template: "tool_use" with tools when present, else "default"."""
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise ChatTemplateError(f"this model has several chat templates ({sorted(self._templates)}) and no default one")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """messages: [{"role": str, "content": str, ...}] -> prompt text.

        ``extra`` become template variables (e.g. ``tools``); they cannot shadow ``messages``
        or ``add_generation_prompt``. Raises ChatTemplateError for anything the template
        refuses or fails on.
        """
        template = self._select(extra.get("tools"))
        # as transformers: tools and documents are defined (None) unless given; message keys
        # whose value is None are dropped (_normalize_chat_messages)
        variables = {**self.special_tokens, "tools": None, "documents": None, **extra}
        variables["messages"] = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages
        ]
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e


__all__ = ["ChatTemplate", "ChatTemplateError", "read_tokenizer_config", "special_tokens_of"]
