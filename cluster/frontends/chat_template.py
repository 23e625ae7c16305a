"""Chat messages -> prompt text through the model's Jinja chat template (sandboxed).

The template comes from ``tokenizer_config.json`` (``chat_template``: one string, or a list of
``{"name", "template"}`` entries of which "default" is used). It is rendered the way HF
transformers' ``apply_chat_template`` renders it, so a prompt built here tokenizes to the
same ids: an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks`` and
loop controls, ``tojson`` without HTML escaping, the ``raise_exception`` and
``strftime_now`` globals, and the tokenizer's special tokens (``bos_token``, ``eos_token``,
...) as variables. The rendered text already holds whatever special tokens the template
writes, so callers tokenize it with ``add_special_tokens=False``.

The sandbox keeps a template (a file from a model repository) from reaching Python
internals; user messages are data, never template source.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or rejected their shape)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template; ``render`` is pure (no state between calls)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], autoescape=False
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)  # a syntax error fails here, at startup

    @staticmethod
    def from_tokenizer_config(config: dict) -> ChatTemplate | None:
        """The template of a tokenizer_config.json dict; None when it has none."""
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        tokens = {name: text for name in _SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        return ChatTemplate(source, tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """messages: [{"role": str, "content": str, ...}] -> prompt text.

        ``extra`` become template variables (e.g. ``tools``); they cannot shadow ``messages``
        or ``add_generation_prompt``. Raises ChatTemplateError for anything the template
        refuses or fails on.
        """
        variables = {**self.special_tokens, **extra, "messages": messages}
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e


__all__ = ["ChatTemplate", "ChatTemplateError"]
