"""The native CPU kernels of the model path (engine/native/csrc/linear.cpp, fused_ops.cpp)
against float64 references and the torch ops they replace, and how the engine selects them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.config import KernelConfig, ModelConfig, RopeConfig
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model_runner import native_kernels_for
from engine.models.layers import STREAM_ROWS_BY_ISA, NativeKernels, RMSNorm, RotaryEmbedding
from engine.models.llama import DecoderLM
from tests.prereq import require_hardware, require_native


@pytest.fixture(scope="module")
def mod():
    return require_native()


# ------------------------------------------------------------------ stream_linear
@pytest.mark.parametrize("m_rows", [1, 2, 3, 4, 5, 8, 13, 16, 17])
@pytest.mark.parametrize("n,k", [(96, 64), (7, 37), (576, 576), (130, 1536)])
def test_stream_linear_matches_float64(mod, m_rows, n, k):
    g = torch.Generator().manual_seed(m_rows * 1000 + n)
    x, w, b = torch.randn(m_rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ w.double().T + b.double()
    y = mod.stream_linear(x, w, b)
    assert y.shape == (m_rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5)
    torch.testing.assert_close(mod.stream_linear(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def test_stream_linear_bfloat16(mod):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 200, generator=g).bfloat16(), torch.randn(70, 200, generator=g).bfloat16()
    ref = x.double() @ w.double().T  # the bf16 inputs are exact in float64; fp32 accumulation
    y = mod.stream_linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the result
    y32 = mod.stream_linear(x.float(), w)  # bf16 weights, fp32 activations -> fp32 out
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-4)


def test_stream_linear_row_is_independent_of_batch_and_threads(mod):
    """A row's output is bit-identical whatever else is in the batch and however many threads run."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(16, 300, generator=g), torch.randn(515, 300, generator=g)
    full = mod.stream_linear(x, w)
    for m_rows in (1, 3, 6, 11):
        assert torch.equal(mod.stream_linear(x[5 : 5 + m_rows], w), full[5 : 5 + m_rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod.stream_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


def test_stream_linear_rejects_bad_input(mod):
    with pytest.raises(RuntimeError, match="must match"):
        mod.stream_linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        mod.stream_linear(torch.randn(2, 8).half(), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="bias must be"):
        mod.stream_linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def test_simd_isa_matches_the_cpu(mod):
    """The build (-march=native) compiled the widest vector paths the CPU has: a machine with
    AVX2 that ran the plain loops would lose 1.4x on its decode step without any test failing."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        pass
    require_hardware(flags, "no x86 flags in /proc/cpuinfo (Linux x86 only)")
    want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "portable"
    assert mod.simd_isa() == want


def test_native_linear_routes_by_rows(mod):
    w = torch.randn(32, 16)
    kn = NativeKernels(mod, max_rows=4)
    x = torch.randn(4, 16)
    pool_before = mod.uses_openmp()
    try:
        assert torch.equal(kn.linear(x, w), mod.stream_linear(x, w))  # at the cut: streamed
        assert not mod.uses_openmp()  # the kernels after it run on the streaming kernel's pool
        x5 = torch.randn(5, 16)
        torch.testing.assert_close(kn.linear(x5, w), F.linear(x5, w))  # above it: oneDNN / MKL
        assert mod.uses_openmp()  # ... and on OpenMP's threads after oneDNN
    finally:
        mod.set_openmp(pool_before)
    x16 = torch.randn(2, 16).half()
    torch.testing.assert_close(kn.linear(x16, w.half()), F.linear(x16, w.half()))  # fp16: torch


# ------------------------------------------------------------------ fused ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_add_rms_norm_match_the_module(mod, dtype):
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    x, delta = (torch.randn(9, 576, generator=g) * 3).to(dtype), torch.randn(9, 576, generator=g).to(dtype)
    exact = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
    with torch.inference_mode():
        ref = norm(x)
        torch.testing.assert_close(mod.rms_norm(x, norm.weight, norm.eps), ref, **_bf16_ulp(dtype, exact))
        summed = x + delta
        xs = x.clone()
        out = mod.add_rms_norm(xs, delta, norm.weight, norm.eps)
    assert torch.equal(xs, summed)  # the residual add happened in place, rounded like torch's
    torch.testing.assert_close(out, norm(summed), **_bf16_ulp(dtype, exact))


def _bf16_ulp(dtype, exact):
    # bf16: our fp32 sum of squares differs from torch's in the last fp32 bits, which can flip
    # one bf16 rounding of x * rsqrt(...): allow one bf16 ulp (2^-8 relative)
    return exact if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_split_qkv_matches_rotary_embedding(mod, dtype):
    h, hkv, d, t = 6, 2, 64, 5
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), d, 256)
    qkv = torch.randn(t, (h + 2 * hkv) * d).to(dtype)
    positions = torch.tensor([0, 1, 17, 200, 255])
    q, k, v = mod.rope_split_qkv(qkv, rope.cos, rope.sin, positions, h, hkv)
    cos, sin = rope.tables(positions, dtype)
    ref_q = RotaryEmbedding.apply(qkv[:, : h * d].view(t, h, d), cos, sin)
    ref_k = RotaryEmbedding.apply(qkv[:, h * d : (h + hkv) * d].view(t, hkv, d), cos, sin)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(q, ref_q, **tol)
    torch.testing.assert_close(k, ref_k, **tol)
    assert torch.equal(v, qkv[:, (h + hkv) * d :].view(t, hkv, d))
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    with pytest.raises(RuntimeError, match="outside the table"):
        mod.rope_split_qkv(qkv, rope.cos, rope.sin, torch.tensor([0, 1, 2, 3, 256]), h, hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(mod, dtype):
    gate_up = (torch.randn(7, 2 * 300) * 8).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero inputs
    gate, up = gate_up.chunk(2, dim=-1)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(mod.silu_mul(gate_up), F.silu(gate) * up, **tol)  # 300: 18 vectors + a tail
    gate_up[1, 5] = float("nan")
    assert torch.isnan(mod.silu_mul(gate_up)[1, 5])  # NaN stays NaN (bf16: 0x7FC0 on the vector path)


def test_write_kv_matches_paged_cache_write(mod):
    layout = KVLayout("float32", 4, 2, 3, 8)
    a, b = PagedKVCache(layout, 10), PagedKVCache(layout, 10)
    slots = torch.tensor([0, 5, 39, 17])
    k, v = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    a.write(1, slots, k, v)
    mod.write_kv(*b.layer(1), slots, k, v)
    assert torch.equal(a.kv, b.kv)
    with pytest.raises(RuntimeError, match="outside the cache"):
        mod.write_kv(*b.layer(1), torch.tensor([0, 1, 2, 40]), k, v)


# ------------------------------------------------------------------ the model on the native path
def _model(tiny_checkpoint, family: str, kernels: NativeKernels | None, dtype=torch.float32) -> DecoderLM:
    from engine.models.loader import load_model

    path = tiny_checkpoint(family)
    cfg = ModelConfig.from_hf_dir(path)
    model = load_model(path, cfg, dtype, "cpu", 512)
    model.set_native_kernels(kernels)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_native_path_matches_torch_path(mod, tiny_checkpoint, family):
    """The same prompts through the native and the torch path: equal greedy tokens, close logprobs."""
    from engine import SamplingParams

    path = tiny_checkpoint(family)
    prompts = [[5, 9, 33, 2, 71, 4], [8] * 20, list(range(3, 40))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = {}
    for native_kernels in (True, False):
        llm = LLM(path, native_kernels=native_kernels, num_blocks=64, block_size=8, skip_tokenizer_init=True)
        assert (llm.engine.model.native is not None) == native_kernels
        outs[native_kernels] = llm.generate(prompts, params)
    for a, b in zip(outs[True], outs[False], strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_native_selection(mod, tiny_checkpoint):
    llama = _model(tiny_checkpoint, "llama", None)
    assert isinstance(native_kernels_for(llama, torch.device("cpu"), KernelConfig()), NativeKernels)
    assert native_kernels_for(llama, torch.device("cpu"), KernelConfig(native=False)) is None
    qwen3 = _model(tiny_checkpoint, "qwen3", None)
    assert native_kernels_for(qwen3, torch.device("cpu"), KernelConfig()) is None  # q/k norm: torch path
    with pytest.raises(RuntimeError, match="q/k-norm"):
        native_kernels_for(qwen3, torch.device("cpu"), KernelConfig(native=True))
    with pytest.raises(ValueError, match="dense layers"):
        qwen3.set_native_kernels(NativeKernels(mod, 16))
    with pytest.raises(ValueError, match="stream_linear_max_rows"):
        KernelConfig(stream_linear_max_rows=-1)
    # None (the default): the cut measured for the vector paths this build compiled
    isa = mod.simd_isa()
    assert isa in STREAM_ROWS_BY_ISA
    assert native_kernels_for(llama, torch.device("cpu"), KernelConfig()).max_rows == STREAM_ROWS_BY_ISA[isa]
    assert native_kernels_for(llama, torch.device("cpu"), KernelConfig(stream_linear_max_rows=7)).max_rows == 7
    llm = LLM(tiny_checkpoint("llama"), stream_linear_max_rows=0, num_blocks=16, skip_tokenizer_init=True)
    assert llm.engine.config.kernels == KernelConfig(native=None, stream_linear_max_rows=0)
    assert llm.engine.model.native.max_rows == 0
    with pytest.raises(TypeError, match="unknown engine options"):
        LLM(tiny_checkpoint("llama"), native_kernel=True)


def test_kernels_called_from_several_threads_at_once(mod):
    """ChunkPool runs one job at a time; concurrent callers (GIL released) get correct results."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(6)
    w = torch.randn(700, 96, generator=g)
    xs = [torch.randn(3, 96, generator=g) for _ in range(8)]
    want = [mod.stream_linear(x, w) for x in xs]

    def call(i: int) -> bool:
        return all(torch.equal(mod.stream_linear(xs[i], w), want[i]) for _ in range(30))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(call, range(8)))


def test_argmax_rows_matches_torch_argmax_including_ties(mod):
    g = torch.Generator().manual_seed(7)
    for v in (1, 15, 16, 31, 32, 47, 1000, 49152):
        x = torch.randint(0, 4, (6, v), generator=g).float()  # many ties: the first index must win
        assert torch.equal(mod.argmax_rows(x), x.argmax(-1)), v
    x = torch.randn(9, 4097, generator=g)
    x[2, 4096] = x[4, 0] = x[5, 17] = x[5, 33] = 1e9
    assert torch.equal(mod.argmax_rows(x), x.argmax(-1))
    assert torch.equal(mod.argmax_rows(x[:, :2000]), x[:, :2000].argmax(-1))  # strided rows
