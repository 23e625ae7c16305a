"""EngineCore(tensor_parallel=comm) in one process: the TP engine path at world size 1 (the
shard is the whole model, every collective the identity) gives exactly the plain engine's
tokens; the combinations it does not take are refused; sampling's ``agree`` hook is called
exactly for unseeded draws. The multi-rank runs are in tests/correctness/test_tp_engine.py."""

from __future__ import annotations

import pytest
import torch

from engine.attention.backend import AttentionMetadata
from engine.config import SpeculativeConfig
from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.models.tensor_parallel import TPReductions, split_metadata
from engine.parallel import LocalCommunicator
from engine.request import SamplingParams
from engine.sampler import sample
from tests.correctness.hf_ref import random_prompts
from tests.unit.engine.tp_engine_ranks import Script, play

OPTIONS = {"num_blocks": 12, "block_size": 8, "max_num_batched_tokens": 64, "native_kernels": False}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tp1_engine_path_equals_the_plain_engine(tiny_checkpoint, family: str) -> None:
    ckpt = tiny_checkpoint(family, vocab_size=515)
    script = Script(random_prompts(seed=3, lengths=(5, 23, 40, 9)), 10, 2, 1, cancel="r2", cancel_step=4)
    config = build_engine_config(ckpt, **OPTIONS)
    tp = EngineCore(config, tensor_parallel=LocalCommunicator())
    assert isinstance(tp.model.parallel, TPReductions)
    got, want = play(tp, script), play(EngineCore(config), script)
    assert got == want
    assert got.preemptions > 0 and got.aborted == ["r2"] and got.free_blocks == got.total_blocks


def test_tp_refuses_what_it_does_not_combine_with(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515)
    spec = build_engine_config(ckpt, speculative_config=SpeculativeConfig(method="ngram", num_speculative_tokens=2))
    with pytest.raises(ValueError, match="EngineConfig.speculative"):
        EngineCore(spec, tensor_parallel=LocalCommunicator())
    with pytest.raises(RuntimeError, match="tensor-parallel shard"):
        EngineCore(build_engine_config(ckpt, native_kernels=True), tensor_parallel=LocalCommunicator())


def test_sampling_agrees_only_on_unseeded_draws() -> None:
    logits = torch.randn(3, 50)
    calls: list[list[int]] = []

    def agree(tokens: list[int]) -> list[int]:
        calls.append(tokens)
        return [7] * len(tokens)  # "rank 0's" tokens

    greedy, seeded = SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=1.0, seed=5)
    tokens, lps = sample(logits, [greedy, seeded, greedy], [0, 0, 0], agree)
    assert calls == [] and tokens[0] == int(logits[0].argmax())
    tokens, lps = sample(logits[:2], [greedy, SamplingParams(temperature=1.0)], [0, 0], agree)
    assert len(calls) == 1 and tokens == [7, 7]
    assert lps[0] is not None and lps[0].token_id == 7  # logprobs are taken of the agreed tokens


def test_split_metadata_cuts_a_sequence_into_two_chunks() -> None:
    # 3 sequences: 4 new rows at context 10, 5 new rows (prefill from 0), 1 decode row at 7
    meta = AttentionMetadata(
        slot_mapping=torch.arange(10),
        query_start_loc=[0, 4, 9, 10],
        seq_lens=[10, 5, 7],
        block_tables=torch.tensor([[1, 2], [3, 0], [4, 0]]),
        request_ids=["a", "b", "c"],
    )
    first, second = split_metadata(meta, 6)  # inside "b": its rows 0-1 first, 2-4 second
    assert (first.query_start_loc, first.seq_lens, first.request_ids) == ([0, 4, 6], [10, 2], ["a", "b"])
    assert (second.query_start_loc, second.seq_lens, second.request_ids) == ([0, 3, 4], [5, 7], ["b", "c"])
    assert first.slot_mapping.tolist() == list(range(6)) and second.slot_mapping.tolist() == list(range(6, 10))
    assert second.block_tables.tolist() == [[3, 0], [4, 0]] and (first.micro_batch, second.micro_batch) == (
        (0, 2),
        (1, 2),
    )
    first, second = split_metadata(meta, 4)  # on a boundary: no sequence in both
    assert (first.request_ids, second.request_ids, second.query_start_loc) == (["a"], ["b", "c"], [0, 5, 6])
    with pytest.raises(ValueError, match="outside"):
        split_metadata(meta, 10)
