"""engine/models/tensor_parallel.py: the shard plan and its errors, sharding a full model
against loading the shards from a checkpoint, TP=1 against transformers, and a rank that dies
mid-forward (spawned gloo ranks, tests/unit/engine/tp_ranks.py)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from engine.config import ModelConfig, MoEConfig
from engine.models.loader import load_model
from engine.models.tensor_parallel import (
    PrefixAttention,
    TokenWeaveConfig,
    TPDivisibilityError,
    TPModel,
    load_tp_shard,
    plan_shard,
    shard_model,
)
from engine.parallel import Communicator, LocalCommunicator, Ready
from tests.unit.engine.tp_ranks import run_tp_ranks, tp_die_mid_forward

WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}


@pytest.fixture
def wide_llama(tiny_checkpoint) -> str:
    """Random-weight Llama, 16 query / 8 KV heads, vocab 515 (uneven at TP=2)."""
    return tiny_checkpoint("llama", vocab_size=515, **WIDE)


def _cfg(**kw) -> ModelConfig:
    from engine.config import RopeConfig

    base = dict(
        architecture="LlamaForCausalLM",
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=2,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope=RopeConfig(),
    )
    return ModelConfig(**{**base, **kw})


def test_plan_splits_heads_mlp_and_vocab() -> None:
    plans = [plan_shard(_cfg(), r, 3) for r in range(3)]  # SmolLM2's shape at TP=3
    assert [(p.heads, p.kv_heads, p.intermediate, p.vocab_shard) for p in plans] == [(3, 1, 512, 16384)] * 3
    assert [(p.vocab_start, p.vocab_end) for p in plans] == [(0, 16384), (16384, 32768), (32768, 49152)]
    local = plans[1].local_config(_cfg())
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (3, 1, 512, 16384)
    # uneven vocab: ceil-sized shards, the last one short (padded with zero rows)
    uneven = [plan_shard(_cfg(vocab_size=10), r, 3) for r in range(3)]
    assert [(p.vocab_start, p.vocab_end, p.vocab_shard) for p in uneven] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]


@pytest.mark.parametrize(
    ("kw", "world", "message"),
    [
        (
            {},
            2,
            r"tensor_parallel=2 does not divide query heads \(num_heads\)=9, KV heads \(num_kv_heads\)=3 .*"
            r"degrees that divide all of them: \[1, 3\]",
        ),
        ({}, 9, r"tensor_parallel=9 does not divide KV heads \(num_kv_heads\)=3, MLP intermediate_size=1536"),
        ({"num_heads": 16, "num_kv_heads": 8, "intermediate_size": 100}, 8, r"MLP intermediate_size=100"),
    ],
)
def test_indivisible_degrees_are_refused_naming_the_numbers(kw: dict, world: int, message: str) -> None:
    with pytest.raises(TPDivisibilityError, match=message):
        plan_shard(_cfg(**kw), 0, world)


def test_moe_experts_are_split_and_their_sizes_checked() -> None:
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=64, norm_topk_prob=True, shared_intermediate_size=96)
    plan = plan_shard(_cfg(num_heads=8, num_kv_heads=4, moe=moe), 1, 4)
    local = plan.local_config(_cfg(num_heads=8, num_kv_heads=4, moe=moe))
    assert local.moe is not None
    assert (local.moe.num_experts, local.moe.intermediate_size, local.moe.shared_intermediate_size) == (4, 16, 24)
    odd = dataclasses.replace(moe, intermediate_size=66)
    with pytest.raises(
        TPDivisibilityError, match=r"expert intermediate_size=66 .*degrees that divide all of them: \[1, 2\]"
    ):
        plan_shard(_cfg(num_heads=8, num_kv_heads=4, moe=odd), 0, 4)


def test_bad_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 / world size 2"):
        plan_shard(_cfg(), 2, 2)
    with pytest.raises(ValueError, match="communicator is rank 0/1, the shard plan 0/3"):
        TPModel(None, plan_shard(_cfg(), 0, 3), LocalCommunicator(), TokenWeaveConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_tokens must be >= 0"):
        TokenWeaveConfig(min_tokens=-1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "qwen2_moe"])
def test_sharding_a_full_model_equals_loading_the_shards(tiny_checkpoint, family: str) -> None:
    ckpt = tiny_checkpoint(family, vocab_size=515, tie_word_embeddings=family == "qwen2", **WIDE)
    cfg = ModelConfig.from_hf_dir(ckpt)
    full = load_model(ckpt, cfg, torch.float32, "cpu", 64)
    for rank in range(2):
        plan = plan_shard(cfg, rank, 2)
        cut, read = shard_model(full, plan), load_tp_shard(ckpt, cfg, plan, 64, torch.float32)
        cut_params, read_params = dict(cut.named_parameters()), dict(read.named_parameters())
        assert cut_params.keys() == read_params.keys()
        for name, p in cut_params.items():
            assert torch.equal(p, read_params[name]), name
        # the vocab shard holds the right rows; the padding row (515 = 2 * 258 - 1) is zero
        assert torch.equal(
            read.embed[: plan.vocab_end - plan.vocab_start], full.embed[plan.vocab_start : plan.vocab_end]
        )
        if rank == 1:
            assert torch.count_nonzero(read.embed[-1]) == 0


def test_tp1_full_forward_matches_transformers(wide_llama: str) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(wide_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 515, (40,), generator=torch.Generator().manual_seed(0))
    for tokenweave in (False, True):  # world size 1: TokenWeave never engages
        model = TPModel.load(wide_llama, LocalCommunicator(), TokenWeaveConfig(enabled=tokenweave, min_tokens=0))
        logits = model.compute_logits(model.forward(ids))
        with torch.inference_mode():
            want = hf(ids[None]).logits[0]
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert model.stats.runs == 0


def test_prefix_attention_refuses_micro_batches_out_of_order() -> None:
    attn = PrefixAttention(sliding_window=None)
    q = torch.zeros(4, 2, 8)
    attn.start = 0
    attn.forward(0, q, q[:, :1], q[:, :1], None)
    attn.start = 8  # 4 keys seen, a micro-batch claiming position 8 skipped one
    with pytest.raises(RuntimeError, match="micro-batch at 8 after 4 keys"):
        attn.forward(0, q, q[:, :1], q[:, :1], None)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("chunk", [128, 4])
def test_prefix_attention_matches_masked_attention_however_split(window: int | None, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, n, 8, generator=g) for n in (4, 2, 2))
    pos = torch.arange(10)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)
    for cuts in ((0, 10), (0, 6, 10), (0, 3, 4, 10)):  # split points on and off chunk boundaries
        attn = PrefixAttention(sliding_window=window)
        attn.CHUNK = chunk
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            attn.start = a
            parts.append(attn.forward(0, q[a:b], k[a:b], v[a:b], None))
        torch.testing.assert_close(torch.cat(parts), want, msg=f"cuts {cuts}")


@pytest.mark.parametrize(
    "tokenweave", [pytest.param(False, marks=pytest.mark.slow), True], ids=["sequential", "tokenweave"]
)
def test_a_rank_that_dies_mid_forward_fails_the_others_within_the_timeout(wide_llama: str, tokenweave: bool) -> None:
    timeout_s = 3.0
    prompt = list(range(3, 67))
    outcomes = run_tp_ranks(tp_die_mid_forward, 2, wide_llama, prompt, tokenweave, 1, 1, timeout_s=timeout_s)
    dead, survivor = outcomes[1], outcomes[0]
    assert dead.exitcode == 3 and dead.error is None, dead
    assert survivor.ok, survivor
    error, seconds = survivor.value
    assert error.startswith("CommunicationError") and "'tp' rank 0/2" in error, error
    assert seconds < timeout_s + 2.0, seconds  # a closed peer fails at once; a silent one within the timeout


@pytest.mark.slow
def test_a_rank_that_hangs_mid_forward_fails_the_others_within_the_timeout(wide_llama: str) -> None:
    timeout_s = 2.0
    prompt = list(range(3, 67))
    outcomes = run_tp_ranks(tp_die_mid_forward, 2, wide_llama, prompt, True, 1, 1, timeout_s + 3.0, timeout_s=timeout_s)
    for o in outcomes:  # the hung rank fails too once it goes on: its peer left the group
        assert o.ok, o
        error, seconds = o.value
        assert error.startswith("CommunicationError"), error
    error, seconds = outcomes[0].value
    assert "timed out" in error or "Timed out" in error, error
    assert 0.8 * timeout_s < seconds < timeout_s + 2.0, seconds


class CountingStandIn(Communicator):
    """Rank 0 of 2 with no peer: collectives return tensors of the right shape at once and
    are counted by name (the model's compute runs; the values are not a real TP result)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    rank = 0  # type: ignore[assignment]
    world_size = 2  # type: ignore[assignment]
    device = torch.device("cpu")  # type: ignore[assignment]

    def _start_all_reduce(self, x):
        self.calls["all_reduce"] += 1
        return Ready(x)

    def _start_reduce_scatter(self, x):
        self.calls["reduce_scatter"] += 1
        return Ready(x[: x.shape[0] // 2].contiguous())

    def _start_all_gather(self, x):
        self.calls["all_gather"] += 1
        return Ready(torch.cat([x, x]))

    def _start_all_to_all(self, x, send_splits, recv_splits):
        raise AssertionError("not used")

    def _start_send(self, x, dst, tag):
        raise AssertionError("not used")

    def _start_recv(self, out, src, tag):
        raise AssertionError("not used")


@pytest.mark.parametrize(
    ("tokens", "config", "want"),
    [
        (31, TokenWeaveConfig(min_tokens=32), {"all_reduce": 5}),  # below the threshold: sequential
        (32, TokenWeaveConfig(min_tokens=32), {"reduce_scatter": 10, "all_gather": 10}),  # 2 x (1 + 2 x 2 layers)
        (32, TokenWeaveConfig(min_tokens=32, fused_norm=False), {"all_reduce": 10}),
        (4000, TokenWeaveConfig(enabled=False), {"all_reduce": 5}),
        (3, TokenWeaveConfig(min_tokens=0), {"all_reduce": 5}),  # fewer than 2 x W tokens: never split
    ],
)
def test_the_threshold_and_switch_pick_the_path(wide_llama: str, tokens: int, config: TokenWeaveConfig, want) -> None:
    comm = CountingStandIn()
    cfg = ModelConfig.from_hf_dir(wide_llama)
    model = TPModel.from_full(load_model(wide_llama, cfg, torch.float32, "cpu", 4096), comm, config)
    hidden = model.forward(torch.arange(tokens) % 500)
    assert hidden.shape == (tokens, cfg.hidden_size)
    assert not hidden.requires_grad and hidden.grad_fn is None  # the comm thread ran in inference mode too
    assert dict(comm.calls) == want
    assert model.stats.runs == (1 if "reduce_scatter" in want or want.get("all_reduce") == 10 else 0)
    model.close()


def test_tokenweave_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TokenWeaveConfig().enabled = False  # type: ignore[misc]
