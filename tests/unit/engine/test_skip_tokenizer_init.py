"""``skip_tokenizer_init``: token-id prompts run on a model directory without tokenizer.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.tokenizer import TokenizerNotLoadedError, load_tokenizer
from tests.correctness.hf_ref import random_prompts

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def no_tokenizer_dir(tiny_checkpoint, tmp_path: Path) -> tuple[str, str]:
    """(full checkpoint, copy of it without any tokenizer file)."""
    src = tiny_checkpoint("llama")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink()
    return src, str(bare)


def test_token_id_prompts_run_without_tokenizer_json(no_tokenizer_dir: tuple[str, str]) -> None:
    full, bare = no_tokenizer_dir
    prompts = random_prompts(seed=5, lengths=(4, 19))
    got = LLM(bare, skip_tokenizer_init=True, num_blocks=32).generate(prompts, PARAMS)
    want = LLM(full, num_blocks=32).generate(prompts, PARAMS)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == 8 for o in got)
    assert [o.text for o in got] == ["", ""]
    assert [o.text for o in want] != ["", ""]


def test_text_prompts_and_stop_strings_need_the_tokenizer(no_tokenizer_dir: tuple[str, str]) -> None:
    _, bare = no_tokenizer_dir
    llm = LLM(bare, skip_tokenizer_init=True, num_blocks=32)
    with pytest.raises(TokenizerNotLoadedError, match="skip_tokenizer_init=True; pass token ids"):
        llm.generate("hello", PARAMS)
    with pytest.raises(TokenizerNotLoadedError, match="stop strings"):
        llm.generate([5, 6, 7], SamplingParams(max_tokens=4, stop=("x",)))
    assert llm.engine.scheduler.num_unfinished == 0
    assert isinstance(TokenizerNotLoadedError("x"), ValueError)


def test_without_the_option_a_missing_tokenizer_says_how_to_skip_it(no_tokenizer_dir: tuple[str, str]) -> None:
    _, bare = no_tokenizer_dir
    assert load_tokenizer(bare, skip_tokenizer_init=True) is None
    with pytest.raises(FileNotFoundError, match="skip_tokenizer_init=True"):
        load_tokenizer(bare)
