"""IncrementalDetokenizer: text deltas, multi-byte characters split over tokens, stop strings.

Uses the tiny byte-level BPE tokenizer (engine/models/tiny.py): characters outside its
training corpus are encoded as one token per UTF-8 byte.
"""

from __future__ import annotations

import pytest

from engine.models.tiny import save_tiny_tokenizer
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    save_tiny_tokenizer(str(path), vocab_size=512)
    return Tokenizer(str(path))


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[bool]:
    return [detok.append(i) for i in ids]


def test_text_accumulates_to_full_decode(tok):
    text = "The harbour town woke slowly, 42 ships waited."
    ids = tok.encode(text)
    assert len(ids) > 5
    d = IncrementalDetokenizer(tok)
    seen = []
    for i in ids:
        assert d.append(i) is False
        seen.append(d.text)
    assert d.text == d.final_text == text == tok.decode(ids)
    assert all(seen[k + 1].startswith(seen[k]) for k in range(len(seen) - 1))  # text only grows


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_character_split_across_tokens(tok, char):
    ids = tok.encode(f"a{char}b")
    char_ids = tok.encode(char)
    assert len(char_ids) >= 2  # the character really is split over several byte tokens
    d = IncrementalDetokenizer(tok)
    texts = []
    for i in ids:
        d.append(i)
        texts.append(d.text)
        assert "\ufffd" not in d.text  # a partial character is never shown
    assert texts[0] == "a"
    assert all(t == "a" for t in texts[1 : len(char_ids)])  # held back until complete
    assert texts[len(char_ids)] == f"a{char}"
    assert d.text == f"a{char}b"


def test_generation_ending_inside_a_character_keeps_its_bytes(tok):
    ids = tok.encode("ok😀")
    partial = ids[:-1]
    d = IncrementalDetokenizer(tok)
    feed(d, partial)
    assert d.text == "ok"
    assert d.final_text == tok.decode(partial)  # "ok\ufffd..." like a one-shot decode
    assert d.final_text.startswith("ok\ufffd")


def test_stop_string_cuts_text(tok):
    ids = tok.encode("the baker on the corner opened his shutters")
    d = IncrementalDetokenizer(tok, stop=("corner",))
    results = feed(d, ids)
    first = results.index(True)
    assert d.text == "the baker on the "
    assert "corner" in tok.decode(ids[: first + 1]) and "corner" not in tok.decode(ids[:first])
    assert all(results[first:])  # once stopped, always stopped
    assert d.final_text == d.text


def test_stop_string_spanning_tokens_and_earliest_match_wins(tok):
    ids = tok.encode("abcdefgh")
    d = IncrementalDetokenizer(tok, stop=("fg", "cde"))
    feed(d, ids)
    assert d.text == "ab"
    # two stop strings completed by the same token: the one starting earlier cuts the text
    d2 = IncrementalDetokenizer(tok, stop=("z", "yz"))
    assert feed(d2, tok.encode("xyz"))[-1] is True  # "z" completes both stop strings
    assert d2.text == "x"


def test_stop_string_on_multibyte_character(tok):
    ids = tok.encode("price: 5€ only")
    d = IncrementalDetokenizer(tok, stop=("€",))
    results = feed(d, ids)
    assert d.text == "price: 5"
    euro_end = len(tok.encode("price: 5€"))
    assert results.index(True) == euro_end - 1  # stops at the token completing the character


def test_stop_string_already_in_previous_text_is_not_rematched(tok):
    d = IncrementalDetokenizer(tok, stop=("ab",))
    for i in tok.encode("xa"):
        assert not d.append(i)
    assert feed(d, tok.encode("b")) == [True]
    assert d.text == "x"
