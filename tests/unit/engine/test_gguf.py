"""engine/models/gguf.py on tiny Llama checkpoints exported to GGUF (tests/unit/engine/gguf_export.py).

A conversion must give back the source checkpoint: same ModelConfig, bit-identical weights
(F32) or ``dequantize(quantize(w))`` (Q8_0), the same tokenizer ids, the chat template, and the
same greedy tokens from ``LLM``. Unsupported files fail with one UnsupportedGGUFError naming
what is unsupported, before anything is written; the cache is keyed by content and written
atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, ModelConfig, SamplingParams
from engine.models import gguf as gguf_mod
from engine.models.gguf import UnsupportedGGUFError, resolve_model_path
from engine.models.gguf_tokenizer import PRE_TOKENIZERS
from engine.models.tiny import CHAT_TEMPLATE
from engine.tokenizer import Tokenizer
from tests.correctness.hf_ref import random_prompts
from tests.unit.engine.gguf_export import export_gguf

REPO = Path(__file__).resolve().parents[3]
TEXTS = ["Hello world", "  leading spaces and 12345 digits", "<s>special</s> ünïcödé\n\ttabs", ""]


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def cache_entries(cache: Path) -> list[str]:
    """Cache directory contents except lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


@pytest.fixture
def tiny(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama")


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 1}])
def test_f32_conversion_gives_back_the_checkpoint(tiny_checkpoint, tmp_path: Path, overrides) -> None:
    src = tiny_checkpoint("llama", **overrides)
    out = resolve_model_path(str(export_gguf(src, tmp_path / "m.gguf")), cache_dir=str(tmp_path / "c"), progress=False)
    assert ModelConfig.from_hf_dir(out) == ModelConfig.from_hf_dir(src)
    got, want = load_weights(out), load_weights(src)
    if overrides.get("tie_word_embeddings"):
        want.pop("lm_head.weight", None)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # exact: Q/K un-permuted correctly
    a, b = Tokenizer(out), Tokenizer(src)
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
        assert a.decode(a.encode(text), skip_special_tokens=False) == text
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))  # special tokens dropped alike
    assert (Path(out) / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((Path(out) / "generation_config.json").read_text())["eos_token_id"] == 2


def test_llm_on_a_gguf_path_generates_like_the_source_dir(
    monkeypatch: pytest.MonkeyPatch, tiny: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "cache"))  # LLM uses the default cache
    path = export_gguf(tiny, tmp_path / "m.gguf")
    prompts = random_prompts(seed=3, lengths=(5, 17, 33))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = LLM(str(path), num_blocks=64).generate(prompts, params)
    want = LLM(tiny, num_blocks=64).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    assert cache_entries(tmp_path / "cache" / "models") == [Path(resolve_model_path(str(path))).name]


def test_q8_0_tensors_are_dequantized(tiny: str, tmp_path: Path) -> None:
    import gguf

    out = resolve_model_path(
        str(export_gguf(tiny, tmp_path / "m.gguf", quant="Q8_0")), cache_dir=str(tmp_path / "c"), progress=False
    )
    got, src = load_weights(out), load_weights(tiny)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = src[name].numpy()
        # Q8_0 blocks run along rows; the Q/K row permutation moves whole rows, so it commutes
        want = gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)
        assert np.array_equal(got[name].numpy(), want), name
        assert not np.array_equal(want, w)  # the quantized path really ran


def test_add_bos_token_prepends_bos(tiny: str, tmp_path: Path) -> None:
    out = resolve_model_path(
        str(export_gguf(tiny, tmp_path / "m.gguf", add_bos=True)), cache_dir=str(tmp_path / "c"), progress=False
    )
    tok = Tokenizer(out)
    assert tok.encode("Hello") == [1, *Tokenizer(tiny).encode("Hello")]
    assert tok.encode("Hello", add_special_tokens=False) == Tokenizer(tiny).encode("Hello")


def test_same_content_reuses_the_conversion_changed_content_does_not(
    monkeypatch: pytest.MonkeyPatch, tiny: str, tmp_path: Path
) -> None:
    cache = str(tmp_path / "c")
    first = resolve_model_path(str(export_gguf(tiny, tmp_path / "a.gguf")), cache_dir=cache, progress=False)
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "a.gguf", tmp_path / "moved" / "a.gguf")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(gguf_mod, "convert_gguf", no_conversion)
        assert resolve_model_path(str(tmp_path / "moved" / "a.gguf"), cache_dir=cache, progress=False) == first
    other = resolve_model_path(str(export_gguf(tiny, tmp_path / "a.gguf", quant="Q8_0")), cache_dir=cache)
    assert other != first


def test_directories_pass_through_and_other_files_are_rejected(tiny: str, tmp_path: Path) -> None:
    assert resolve_model_path(tiny) == tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="needs a model directory"):
        ModelConfig.from_hf_dir(str(tmp_path / "x.gguf"))


def _unsupported_cases(tiny: str, tmp_path: Path) -> list[tuple[Path, str]]:
    import gguf

    iq = gguf.GGMLQuantizationType.IQ2_XXS
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[iq]
    raw = np.zeros((4, 256 // block_elems * block_bytes), dtype=np.uint8)
    return [
        (export_gguf(tiny, tmp_path / "arch.gguf", architecture="qwen3moe"), "architecture 'qwen3moe'"),
        (
            export_gguf(tiny, tmp_path / "quant.gguf", raw_tensors={"blk.0.extra.weight": (raw, iq)}),
            r"tensor type IQ2_XXS is not supported \(tensors \['blk.0.extra.weight'\]",
        ),
        (export_gguf(tiny, tmp_path / "spm.gguf", tokenizer_model="llama"), "tokenizer model 'llama'"),
        (export_gguf(tiny, tmp_path / "pre.gguf", pre="mystery"), "pre-tokenizer 'mystery'"),
        (
            export_gguf(
                tiny, tmp_path / "name.gguf", raw_tensors={"rope_freqs.weight": (np.ones(8, np.float32), None)}
            ),
            "rope_freqs.weight",
        ),
    ]


def test_unsupported_files_raise_one_error_naming_the_cause(tiny: str, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    for path, match in _unsupported_cases(tiny, tmp_path):
        with pytest.raises(UnsupportedGGUFError, match=match) as err:
            resolve_model_path(str(path), cache_dir=str(cache), progress=False)
        assert isinstance(err.value, ValueError)
        assert "\n" not in str(err.value)
    assert cache_entries(cache) == []  # nothing written, temp directories removed


def test_interrupted_conversion_leaves_no_directory(monkeypatch: pytest.MonkeyPatch, tiny: str, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    path = str(export_gguf(tiny, tmp_path / "m.gguf"))
    real = gguf_mod._write_weights

    def write_then_fail(g, plan, config, out, progress):
        real(g, plan, config, out, progress)
        assert os.listdir(out)  # something was half-written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(gguf_mod, "_write_weights", write_then_fail)
        with pytest.raises(KeyboardInterrupt):
            resolve_model_path(path, cache_dir=str(cache), progress=False)
    assert cache_entries(cache) == []
    out = resolve_model_path(path, cache_dir=str(cache), progress=False)
    assert cache_entries(cache) == [Path(out).name]


_KILLED_CHILD = textwrap.dedent(
    """
    import sys
    from engine.models import gguf

    real = gguf._write_weights

    def write_then_wait(g, plan, config, out, progress):
        real(g, plan, config, out, progress)
        print("mid-write", flush=True)
        sys.stdin.read()  # until killed

    gguf._write_weights = write_then_wait
    gguf.resolve_model_path(sys.argv[1], cache_dir=sys.argv[2], progress=False)
    """
)


def test_killed_conversion_leaves_no_directory_and_next_run_cleans_up(tiny: str, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    path = str(export_gguf(tiny, tmp_path / "m.gguf"))
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, path, str(cache)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "mid-write"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=120)
    left = cache_entries(cache)
    assert len(left) == 1 and ".tmp-" in left[0], left  # only the hidden temp dir of the killed run
    out = resolve_model_path(path, cache_dir=str(cache), progress=False)
    assert cache_entries(cache) == [Path(out).name]
    assert ModelConfig.from_hf_dir(out) == ModelConfig.from_hf_dir(tiny)


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("gpt-2", "ab 12345", ["ab", "Ġ12345"]),
        ("smollm", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", "ab 12345", ["ab", "Ġ", "123", "45"]),
        ("qwen2", "ab 12345", ["ab", "Ġ", "1", "2", "3", "4", "5"]),
    ],
)
def test_pre_tokenizers_split_as_their_model_families_do(pre: str, text: str, pieces: list[str]) -> None:
    assert [p for p, _ in PRE_TOKENIZERS[pre].build().pre_tokenize_str(text)] == pieces
