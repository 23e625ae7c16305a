"""``splitserve draft``: the self-draft is the target's forward cut after N layers.

The draft directory is loaded by the engine (engine.LLM) and compared with transformers
running the *target* checkpoint with its decoder layers cut to the first N.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from cluster.cli import main
from engine.llm import LLM
from engine.models import self_draft
from engine.models.loader import safetensors_files
from engine.request import SamplingParams
from tests.real_model import transformers_module

PROMPT = [5, 17, 99, 3, 250, 8, 41]


def truncated_hf_greedy(target_dir: str, layers: int, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers on the target with only its first ``layers`` decoder layers: greedy ids and
    the log-probability of each."""
    model = transformers_module().AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
    model.config.num_hidden_layers = layers
    ids, out, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(logits.argmax())
            out.append(tok)
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            ids.append(tok)
    return out, lps


def tensor_names(path: str) -> set[str]:
    names = set()
    for file in safetensors_files(path):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize(
    ("family", "extra"),
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen3", {}), ("qwen2", {})],
    ids=["llama", "llama-tied", "qwen3", "qwen2"],
)
def test_draft_equals_the_targets_truncated_forward(tiny_checkpoint, tmp_path, family, extra):
    target = tiny_checkpoint(family, num_hidden_layers=4, **extra)
    out = str(tmp_path / "draft")
    assert main(["draft", "--from", target, "--layers", "2", "--out", out]) == 0
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert cfg["num_hidden_layers"] == 2
    names = tensor_names(out)
    assert not any(".layers.2." in n or ".layers.3." in n for n in names)
    assert {"model.layers.1.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"} <= names
    assert ("lm_head.weight" in names) == (not extra.get("tie_word_embeddings", False))
    for f in ("tokenizer.json", "tokenizer_config.json", self_draft.STAMP_FILE):
        assert os.path.exists(os.path.join(out, f)), f
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp directory left

    want, want_lp = truncated_hf_greedy(target, 2, PROMPT, 6)
    llm = LLM(out, skip_tokenizer_init=True, num_blocks=32, block_size=4)
    got = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0))[0]
    assert got.token_ids == want
    assert [lp.logprob for lp in got.logprobs] == pytest.approx(want_lp, abs=1e-4)


def test_sharded_target_and_sharded_draft(tiny_checkpoint, tmp_path, monkeypatch):
    target = tiny_checkpoint("llama", num_hidden_layers=4, sharded=True)
    monkeypatch.setattr(self_draft, "SHARD_BYTES", 200_000)  # force several output shards
    out = self_draft.build_self_draft(target, 3, str(tmp_path / "d"))
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert len(safetensors_files(out)) > 1
    want, _ = truncated_hf_greedy(target, 3, PROMPT, 4)
    got = LLM(out, skip_tokenizer_init=True, num_blocks=32, block_size=4).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )
    assert got[0].token_ids == want


def test_bad_arguments_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    target = tiny_checkpoint("llama", num_hidden_layers=4)
    out = str(tmp_path / "d")
    assert main(["draft", "--from", target, "--layers", "4", "--out", out]) == 2
    assert "layers must be in [1, 3] for a target of 4 layers, got 4" in capsys.readouterr().err
    assert main(["draft", "--from", str(tmp_path / "missing"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["draft", "--from", target, "--layers", "0", "--out", out])
    assert e.value.code == 2
    assert not os.path.exists(out)


def test_existing_output_is_replaced_only_with_force_and_only_if_a_self_draft(tiny_checkpoint, tmp_path, capsys):
    target = tiny_checkpoint("llama", num_hidden_layers=4)
    out = str(tmp_path / "d")
    assert main(["draft", "--from", target, "--out", out]) == 0  # default: 80 % of 4 layers
    assert json.loads(open(os.path.join(out, "config.json")).read())["num_hidden_layers"] == 3
    assert main(["draft", "--from", target, "--layers", "2", "--out", out]) == 2
    assert "already exists (pass force to replace a self-draft)" in capsys.readouterr().err
    assert main(["draft", "--from", target, "--layers", "2", "--out", out, "--force"]) == 0
    assert json.loads(open(os.path.join(out, "config.json")).read())["num_hidden_layers"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["draft", "--from", target, "--out", str(foreign), "--force"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["d", "mine"]


def test_default_layers():
    assert self_draft.default_draft_layers(30) == 24
    assert self_draft.default_draft_layers(2) == 1
    assert self_draft.default_draft_layers(4) == 3


@pytest.mark.slow
def test_self_draft_of_the_real_model(tmp_path):
    """SmolLM2-135M's 4-layer self-draft is its truncated forward (transformers), and a
    speculative greedy run with it emits the plain greedy output."""
    from engine.config import ModelConfig
    from engine.spec.draft import DraftProposer
    from engine.spec.offline import speculative_generate
    from engine.spec.paged_model import PagedModel
    from tests.real_model import real_model_dir

    target = real_model_dir()
    out = str(tmp_path / "smol-4")
    assert main(["draft", "--from", target, "--layers", "4", "--out", out]) == 0
    prompt = [1, 9690, 198, 2683, 314, 253, 5356, 30]  # any ids: the comparison is numeric
    want, want_lp = truncated_hf_greedy(target, 4, prompt, 3)
    got = LLM(out, skip_tokenizer_init=True, num_blocks=16, block_size=16).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)
    )[0]
    assert got.token_ids == want
    assert [lp.logprob for lp in got.logprobs] == pytest.approx(want_lp, abs=1e-3)

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = speculative_generate(PagedModel.load(target, 256, 8, 16), None, [prompt], params, 0)
    draft = DraftProposer.load(out, ModelConfig.from_hf_dir(target), 256, 8, 16, target_path=target)
    spec = speculative_generate(PagedModel.load(target, 256, 8, 16), draft, [prompt], params, 3)
    assert spec.outputs == plain.outputs
    assert spec.stats.proposed > 0
