"""Tokenizer (``tokenizers`` library, tokenizer.json) and incremental detokenization.

``load_tokenizer(model, skip_tokenizer_init)`` is what engine entry points call: with
``skip_tokenizer_init=True`` no tokenizer is loaded (None), so a model directory without
tokenizer.json serves token-id prompts; callers then reject text prompts and stop strings.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as HFTokenizer

from engine.models.gguf import resolve_model_path


class TokenizerNotLoadedError(ValueError):
    """Text in or out was asked of an engine started with ``skip_tokenizer_init=True``."""


class Tokenizer:
    def __init__(self, path: str):
        """``path``: a model directory with tokenizer.json, or a .gguf file (its converted directory)."""
        path = resolve_model_path(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(
                f"no tokenizer.json in {path!r} (token-id prompts need none: pass skip_tokenizer_init=True)"
            )
        self._tok = HFTokenizer.from_file(file)
        self.vocab_size = self._tok.get_vocab_size()
        cfg_file = os.path.join(path, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                self.config = json.load(f)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(model: str, skip_tokenizer_init: bool = False) -> Tokenizer | None:
    """The model's tokenizer, or None when ``skip_tokenizer_init`` (token-id prompts only)."""
    return None if skip_tokenizer_init else Tokenizer(model)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas; watches for stop strings.

    Invariant: ``text`` is the decoded text of all tokens up to ``_read``; a trailing partial
    UTF-8 sequence (decoded as U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into text
        self.stopped = False

    def append(self, token_id: int) -> bool:
        """Add a token; returns True when a stop string has appeared (text is cut before it)."""
        self.ids.append(token_id)
        if self.stopped:
            return True
        old_len = len(self.text)
        prev = self.tokenizer.decode(self.ids[self._prefix : self._read])
        cur = self.tokenizer.decode(self.ids[self._prefix :])
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):
            self.text += cur[len(prev) :]
            self._prefix, self._read = self._read, len(self.ids)
        # a new match must end inside the newly added text; the earliest match wins
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, old_len - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return True
        return False

    @property
    def final_text(self) -> str:
        """The text of a finished request: ``text`` plus any held-back partial character.

        Generation can end in the middle of a multi-byte character; its bytes decode to
        U+FFFD here, as in ``Tokenizer.decode`` of the whole output. Text cut at a stop string
        is returned as is.
        """
        if self.stopped or self._read == len(self.ids):
            return self.text
        prev = self.tokenizer.decode(self.ids[self._prefix : self._read])
        return self.text + self.tokenizer.decode(self.ids[self._prefix :])[len(prev) :]
