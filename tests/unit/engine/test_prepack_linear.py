"""oneDNN-packed linear weights (KernelConfig.prepack_linear, engine/models/layers.py
pack_linear_weight): the engine reorders its float32 linear weights once at load, and every
linear then runs oneDNN on the packed weight. Packing changes only the summation order, so
logits stay within float rounding of the plain weights' and greedy tokens are equal."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models.layers import (
    ONEDNN_LINEAR,
    ONEDNN_MIN_WEIGHT,
    PACKABLE_DTYPES,
    NativeKernels,
    linear,
    pack_linear_weight,
    packable,
)
from tests.prereq import require, require_native


@pytest.fixture(autouse=True)
def _onednn_linear() -> None:
    require(ONEDNN_LINEAR, "oneDNN linear is off: a torch without mkldnn, or SPLITSERVE_ONEDNN_LINEAR=0")


# wide enough that every linear reaches ONEDNN_MIN_WEIGHT (o: 512 x 512 = 2^18 elements)
WIDE = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 2, 7, 11, 3], list(range(20, 47)), [100, 4, 8, 15, 16, 23, 42]]
ENGINE = {"block_size": 8, "num_blocks": 64, "skip_tokenizer_init": True}


def _mkldnn_params(llm: LLM) -> list[str]:
    return [n for n, p in llm.engine.model.named_parameters() if p.is_mkldnn]


@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
@pytest.mark.parametrize("native", [False, True], ids=["torch-ops", "native-kernels"])
def test_packed_weights_give_the_plain_weights_tokens(tiny_checkpoint, tied: bool, native: bool) -> None:
    """Without the streaming kernel the packed form replaces each weight; with it the plain
    weights stay (rows <= stream_linear_max_rows stream them) and the packed copies sit in
    the native kernels' map (larger row counts run oneDNN on them)."""
    if native:
        require_native()
    ckpt = tiny_checkpoint("llama", tie_word_embeddings=tied, **WIDE)
    packed = LLM(ckpt, native_kernels=native, **ENGINE)  # the default: prepack_linear=True
    plain = LLM(ckpt, native_kernels=native, prepack_linear=False, **ENGINE)
    model = packed.engine.model
    n = 4 * model.cfg.num_layers + 1  # qkv, o, gate_up, down per layer + the head
    assert _mkldnn_params(plain) == [] and (plain.engine.model.native is None or not plain.engine.model.native.packed)
    if native:
        assert _mkldnn_params(packed) == [] and model.head_packed is None  # the streaming kernel reads them
        assert len(model.native.packed) == n and all(p.is_mkldnn for p in model.native.packed.values())
        head = model.embed if tied else model.lm_head
        assert id(head) in model.native.packed
    else:
        assert len(_mkldnn_params(packed)) == n, _mkldnn_params(packed)
        assert not model.embed.is_mkldnn  # lookups read the plain embedding
        assert (model.head_packed is not None) == tied and (model.lm_head is None) == tied
    # prefill chunks (> stream_linear_max_rows rows) run the packed copies, 3-row decode steps stream
    got = [o.token_ids for o in packed.generate(PROMPTS, GREEDY)]
    want = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    assert got == want
    assert [o.token_ids for o in packed.generate(PROMPTS[:1], GREEDY)] == want[:1]


def test_a_packed_weight_computes_the_plain_product_in_every_path() -> None:
    torch.manual_seed(0)
    w = torch.randn(1024, 512)
    b = torch.randn(1024)
    assert packable(w) and not packable(w[:, :100]) and not packable(w.half())
    assert packable(w.bfloat16()) == (torch.bfloat16 in PACKABLE_DTYPES)  # where oneDNN runs bf16 natively
    assert not packable(torch.randn(8, ONEDNN_MIN_WEIGHT // 8 - 1))
    p = pack_linear_weight(w)
    assert p.is_mkldnn and p.shape == w.shape and not p.requires_grad
    with pytest.raises(ValueError, match="not a packable weight"):
        pack_linear_weight(p)

    class NoStream:  # a packed weight must never reach the streaming kernel
        def stream_linear(self, *_):
            raise AssertionError("stream_linear called with a packed weight")

        def set_openmp(self, on: bool) -> None:
            assert on, "a packed weight runs on oneDNN's (OpenMP) threads"

    kernels = NativeKernels(NoStream(), max_rows=64)  # type: ignore[arg-type]
    with torch.inference_mode():
        for rows in (1, 7, 64, 300):
            x = torch.randn(rows, 512)
            ref = torch.nn.functional.linear(x, w, b)
            torch.testing.assert_close(linear(x, p, b), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(kernels.linear(x, p, b), ref, rtol=1e-4, atol=1e-4)
    if torch.bfloat16 in PACKABLE_DTYPES:  # a bf16 model's weights: the bf16 product, packed or not
        wb, bb = w.bfloat16(), b.bfloat16()
        pb = pack_linear_weight(wb)
        assert pb.is_mkldnn and pb.dtype == torch.bfloat16
        with torch.inference_mode():
            for rows in (1, 7, 64):
                x = torch.randn(rows, 512).bfloat16()
                ref = torch.nn.functional.linear(x.float(), wb.float(), bb.float())
                got = linear(x, pb, bb)
                assert got.dtype == torch.bfloat16
                torch.testing.assert_close(got.float(), ref, rtol=2**-7, atol=0.05)

    class Streams:  # counts the rows it streamed, and which threads each call chose
        rows: list[int] = []
        openmp: list[bool] = []

        def stream_linear(self, x, w, b):
            self.rows.append(x.shape[0])
            return torch.nn.functional.linear(x, w, b)

        def set_openmp(self, on: bool) -> None:
            self.openmp.append(on)

    streams = Streams()
    hybrid = NativeKernels(streams, max_rows=4, packed={id(w): p})  # type: ignore[arg-type]
    with torch.inference_mode():
        for rows in (1, 4, 5, 64):
            x = torch.randn(rows, 512)
            torch.testing.assert_close(
                hybrid.linear(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4
            )
    assert streams.rows == [1, 4]  # above max_rows the packed copy ran
    assert streams.openmp == [False, False, True, True]  # ... and the next kernels run on OpenMP's threads
