"""``splitserve route-log`` writes a routing log whose choices are the model's own: every
logged token's top-k ids equal the top-k of transformers' router logits on the same
sequence (the prompt, then the greedy tokens the engine generated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.cli import main
from engine import LLM
from engine.tokenizer import Tokenizer
from expert_router.routing_log import RoutingLog
from tests.correctness.hf_ref import greedy_params, hf_model

PROMPTS = ["The harbour town woke slowly.", "Good software is built in small steps.", "", "Rain moved."]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_route_log_records_the_routers_top_k(tiny_checkpoint, tmp_path, capsys, family: str) -> None:
    ckpt = tiny_checkpoint(family)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "route.npz"
    assert (
        main(["route-log", "--model", ckpt, "--prompts", str(prompts_file), "--out", str(out), "--max-tokens", "5"])
        == 0
    )
    assert "3 sequences" in capsys.readouterr().out
    log = RoutingLog.load(str(out))
    assert log.num_sequences == 3 and log.top_k == 2 and log.layers == (0, 1)

    tok = Tokenizer(ckpt)
    texts = [t for t in PROMPTS if t]
    generated = LLM(ckpt).generate(texts, greedy_params(5))
    hf = hf_model(ckpt)
    for s, (text, gen) in enumerate(zip(texts, generated, strict=True)):
        seq = tok.encode(text) + gen.token_ids[:-1]  # the last token is never fed to the model
        logged = log.sequences()[s]
        assert logged.shape == (len(seq), 2, 2)
        with torch.inference_mode():
            router = hf(torch.tensor([seq]), output_router_logits=True).router_logits
        for li in range(2):
            want = torch.topk(router[li].float().softmax(-1), 2, dim=-1).indices.numpy()
            assert np.array_equal(logged[:, li], want), f"{family} sequence {s} layer {li}"


def test_route_log_refuses_a_dense_model_and_an_empty_prompt_file(tiny_checkpoint, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["route-log", "--model", tiny_checkpoint("mixtral"), "--prompts", str(empty), "--out", "x.npz"]) == 2
    assert "no prompts" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert main(["route-log", "--model", tiny_checkpoint("llama"), "--prompts", str(prompts), "--out", "x.npz"]) == 2
    assert "not a mixture-of-experts model" in capsys.readouterr().err


def test_a_file_that_is_not_a_routing_log_is_refused(tmp_path) -> None:
    path = str(tmp_path / "other.npz")
    np.savez(path, ids=np.zeros((1, 1, 1)))
    with pytest.raises(ValueError, match="not a routing log"):
        RoutingLog.load(path)
