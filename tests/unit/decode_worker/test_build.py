"""build_decode_worker / build_prefill_worker: .gguf model paths and skip_tokenizer_init."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from decode_worker.build import build_decode_worker
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from prefill_worker.build import build_prefill_worker
from tests.unit.engine.gguf_export import export_gguf

ENGINE = {"block_size": 4, "num_blocks": 16, "max_num_batched_tokens": 16}
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = list(range(5, 17))


def _drain(w, rid: str) -> list[int]:
    tokens, cursor = [], 0
    while True:
        c = w.read(rid, cursor, timeout=10)
        tokens += c.token_ids
        cursor += len(c.token_ids)
        if c.finished:
            assert c.error is None, c.error
            return tokens


@pytest.fixture
def tokenizerless(tiny_checkpoint, tmp_path) -> str:
    """The tiny checkpoint without tokenizer.json (token-id prompts only)."""
    out = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_checkpoint("llama"), out)
    (out / "tokenizer.json").unlink()
    return str(out)


def test_skip_tokenizer_init_serves_token_ids_without_tokenizer_json(tiny_checkpoint, tokenizerless):
    with pytest.raises(FileNotFoundError, match="skip_tokenizer_init"):
        build_decode_worker(tokenizerless, ENGINE, transport=None)
    w = build_decode_worker(tokenizerless, {**ENGINE, "skip_tokenizer_init": True}, transport=None)
    try:
        assert w.tokenizer is None
        w.generate_local(RequestSpec("r", PROMPT, PARAMS))
        expected = LLM(tiny_checkpoint("llama"), **ENGINE).generate([PROMPT], PARAMS)[0].token_ids
        assert _drain(w, "r") == expected
    finally:
        w.shutdown()
    p = build_prefill_worker(tokenizerless, {**ENGINE, "skip_tokenizer_init": True}, transport="loopback")
    try:
        assert p.tokenizer is None
    finally:
        p.shutdown()


def test_a_gguf_path_is_converted_once_and_served(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "cache"))
    gguf = export_gguf(tiny_checkpoint("llama"), tmp_path / "tiny.gguf")
    w = build_decode_worker(str(gguf), ENGINE, transport=None)
    p = build_prefill_worker(str(gguf), ENGINE, transport="loopback")
    try:
        converted = Path(w.engine.config.model_path)
        assert converted.parent == tmp_path / "cache" / "models" and (converted / "config.json").is_file()
        assert p.engine.config.model_path == str(converted)  # the second builder reused the conversion
        assert w.tokenizer is not None and p.tokenizer is not None
        w.generate_local(RequestSpec("r", PROMPT, PARAMS))
        expected = LLM(tiny_checkpoint("llama"), **ENGINE).generate([PROMPT], PARAMS)[0].token_ids
        assert _drain(w, "r") == expected  # F32 export: the same weights as the source
    finally:
        w.shutdown()
        p.shutdown()
