"""The greedy head (engine/models/greedy_head.py): plain-greedy steps take each row's float32
argmax from a bf16 screen of the head plus a float32 refinement of the tokens the screen's
rigorous bound cannot rule out. Checked against float64 products (a reference these kernels do
not compute), on heads built so that bf16 cannot tell the top tokens apart, through both
screens (the streaming kernel's float32 logits for few rows, oneDNN's bf16 GEMM above)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models.greedy_head import MAX_CANDIDATES_PER_ROW, GreedyHead
from engine.models.layers import NativeKernels
from tests.prereq import require_hardware, require_native

ROWS = [1, 3, 8, 64]  # 1-3: the streaming kernel's screen (max_rows 4); 8, 64: oneDNN bf16
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module")
def native() -> NativeKernels:
    return NativeKernels(require_native(), max_rows=4)


def _screens(native: NativeKernels, n: int) -> None:
    """Skip unless this machine can screen n rows: above max_rows that is oneDNN's bf16 GEMM."""
    if n > native.max_rows:
        require_hardware(ONEDNN_BF16, "oneDNN bf16 GEMM (AVX512-BF16 or AMX)")


def _close_call_head(vocab: int = 4096, hidden: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [V, H], x [64, H]): every row of x has ~20 tokens whose logits differ by less than bf16
    can resolve (rows of w that are one base row plus float32-sized perturbations), so the
    screen keeps several candidates and only the float32 refinement can pick the argmax."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=g) * 0.05
    x = torch.randn(64, hidden, generator=g)
    for r in range(x.shape[0]):  # row r's close group: 20 near-copies of a base row
        base = x[r] / x[r].norm() * 0.6
        ids = torch.randperm(vocab, generator=g)[:20]
        w[ids] = base + torch.randn(20, hidden, generator=g) * 2e-4
    return w, x


def _reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax per row, gap between its top two logits), in float64."""
    top = (x.double() @ w.double().T).topk(2, dim=1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


@pytest.mark.parametrize("n", ROWS)
def test_tokens_are_the_float32_argmax_where_bf16_cannot_tell(native: NativeKernels, n: int) -> None:
    _screens(native, n)
    w, x = _close_call_head()
    head = GreedyHead.build(w, native)
    assert head is not None
    want, gap = _reference(x, w)
    got = []
    for i in range(0, x.shape[0], n):
        rows = head.tokens(x[i : i + n])
        assert rows is not None
        got += rows
    clear = gap > 1e-4  # float32 orders these the way float64 does (rounding is ~1e-6 here)
    assert int(clear.sum()) >= 48
    assert torch.equal(torch.tensor(got)[clear], want[clear])
    assert head.rows == x.shape[0]
    assert head.candidates >= 3 * head.rows  # the screen alone could not decide: refinement did


@pytest.mark.parametrize("n", ROWS)
def test_the_bound_covers_every_screened_logit(native: NativeKernels, n: int) -> None:
    """|screened - exact| <= B for every token; where the screen returns bf16, B also covers
    the logit's own rounding (u' |logit|, which ``tokens`` bounds by the row's maximum for
    the tokens near it)."""
    from engine.models.greedy_head import _U_OUT

    _screens(native, n)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8192, 192, generator=g) * 0.3
    x = torch.randn(n, 192, generator=g) * 4
    head = GreedyHead(w, native)
    screened, bound = head._screen(x)
    exact = x.double() @ w.double().T
    err = (screened.double() - exact).abs()
    bound = bound.double().unsqueeze(1).expand_as(err)
    if screened.dtype != torch.float32:  # each logit also rounded to bf16 on the way out
        assert screened.dtype == torch.bfloat16 and n > native.max_rows
        bound = (bound + _U_OUT * exact.abs()) / (1 - 2 * _U_OUT)
    assert err.max() > 0  # the screen is not the float32 product
    assert bool((err <= bound).all())


def test_ties_go_to_the_lowest_token_id(native: NativeKernels) -> None:
    w, x = _close_call_head(seed=2)
    w[7] = w[3000] = x[0] / x[0].norm() * 2  # two equal rows, far above the rest for row 0
    head = GreedyHead(w, native)
    for n in (1, 4) + ((8,) if ONEDNN_BF16 else ()):
        assert head.tokens(x[:n])[0] == 7


def test_without_onednn_bf16_only_streamed_steps_are_screened(native: NativeKernels) -> None:
    """Where oneDNN has no native bf16 GEMM (AVX2 machines), steps of at most max_rows rows
    are still screened by the streaming kernel, and larger ones take the full head (None)."""
    w, x = _close_call_head(seed=3)
    head = GreedyHead(w, native, onednn_bf16=False)
    assert head.w_bf16_packed is None  # no oneDNN copy: one bf16 head's bytes
    want, gap = _reference(x[:4], w)
    got = head.tokens(x[:4])
    assert got is not None and head.candidates >= 3 * 4
    clear = gap > 1e-4
    assert torch.equal(torch.tensor(got)[clear], want[clear])
    assert head.tokens(x[:5]) is None and head.rows == 4  # above max_rows: the caller's full head


def test_rows_it_cannot_screen_fall_back(native: NativeKernels) -> None:
    w, x = _close_call_head(vocab=MAX_CANDIDATES_PER_ROW + 512)
    head = GreedyHead(w, native)
    nan = x[:2].clone()
    nan[1, 5] = float("nan")
    assert head.tokens(nan) is None  # NaN logits: the full product decides (torch's NaN rule)
    flat = torch.zeros(4, w.shape[1])  # every logit 0: every token a candidate
    assert head.tokens(flat) is None
    assert head.tokens(x[:4]) is not None


def test_build_declines_heads_it_does_not_cover(native: NativeKernels) -> None:
    w = torch.randn(512, 64)
    assert GreedyHead.build(w, None) is None  # the refinement is a native kernel
    assert GreedyHead.build(w.bfloat16(), native) is None  # a bf16 model's head is already bf16
    assert GreedyHead.build(w, native) is not None
    if not ONEDNN_BF16:  # neither screen: no streaming steps and no bf16 GEMM
        assert GreedyHead.build(w, NativeKernels(native.module, max_rows=0)) is None


GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ENGINE = {"block_size": 8, "num_blocks": 96, "skip_tokenizer_init": True}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
def test_engine_tokens_equal_the_full_head(native: NativeKernels, tiny_checkpoint, tied: bool) -> None:
    """engine.LLM with the greedy head (the default) against the full float32 head: the same
    tokens at 1-row and multi-row steps; a sampled or logprobs request takes the full head."""
    ckpt = tiny_checkpoint("llama", tie_word_embeddings=tied, vocab_size=2048, **WIDE)
    screened = LLM(ckpt, **ENGINE)
    full = LLM(ckpt, greedy_head=False, **ENGINE)
    head = screened.engine.runner.greedy_head
    assert head is not None and full.engine.runner.greedy_head is None
    prompts = [[5, 9, 2, 7, 11, 3], list(range(20, 47)), [100, 4, 8, 15, 16, 23, 42], list(range(300, 310))]
    want = [o.token_ids for o in full.generate(prompts, GREEDY)]
    assert [o.token_ids for o in screened.generate(prompts, GREEDY)] == want
    assert [o.token_ids for o in screened.generate(prompts[:1], GREEDY)] == want[:1]
    used = head.rows
    assert used > 0
    lp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    out = screened.generate(prompts[:1], lp)[0]
    assert head.rows == used and out.token_ids == want[0][:4] and len(out.logprobs) == 4


def test_a_model_without_native_layers_gets_the_greedy_head_too(native: NativeKernels, tiny_checkpoint) -> None:
    """MoE models run torch ops (no native layers), but their head is screened the same way;
    a streamed screen hands torch's OpenMP threads back to the native kernels afterwards."""
    ckpt = tiny_checkpoint("mixtral", vocab_size=2048, hidden_size=256, intermediate_size=256)
    screened = LLM(ckpt, **ENGINE)
    full = LLM(ckpt, greedy_head=False, **ENGINE)
    assert screened.engine.model.native is None
    head = screened.engine.runner.greedy_head
    assert head is not None and head.restore_openmp
    prompts = [[5, 9, 2, 7, 11, 3], list(range(20, 47))]
    want = [o.token_ids for o in full.generate(prompts, GREEDY)]
    assert [o.token_ids for o in screened.generate(prompts, GREEDY)] == want
    assert head.rows > 0
    assert native.module.uses_openmp()  # the default a torch-op model's kernels run with
