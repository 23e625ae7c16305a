"""Building blocks shared by every model family: linear, RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import RopeConfig

# Large fp32 weights on CPU go through oneDNN instead of F.linear's MKL GEMM (see ``linear``).
# SPLITSERVE_ONEDNN_LINEAR=0 (read at import) keeps F.linear everywhere.
ONEDNN_LINEAR = (
    os.environ.get("SPLITSERVE_ONEDNN_LINEAR", "1") != "0"
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
ONEDNN_MIN_WEIGHT = 1 << 18  # elements; below this oneDNN's ~15 us fixed cost per call dominates
# The row count oneDNN is told to expect when it reorders a weight (pack_linear_weight): its
# blocked layout then serves every row count, 1 to hundreds (benchmarks/linear_kernels.py).
PACK_ROWS_HINT = 16


def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """float32, and bfloat16 where oneDNN runs bf16 natively (AVX512-BF16 / AMX)."""
    if ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


PACKABLE_DTYPES = _packable_dtypes()


def packable(w: torch.Tensor) -> bool:
    """Whether ``pack_linear_weight`` takes ``w``: a plain CPU matrix of a ``PACKABLE_DTYPES``
    dtype large enough that oneDNN pays (``ONEDNN_MIN_WEIGHT``), with oneDNN linear on
    (``ONEDNN_LINEAR``)."""
    return (
        ONEDNN_LINEAR
        and w.dim() == 2
        and not w.is_mkldnn
        and w.dtype in PACKABLE_DTYPES
        and w.device.type == "cpu"
        and w.numel() >= ONEDNN_MIN_WEIGHT
    )


def pack_linear_weight(w: torch.Tensor) -> nn.Parameter:
    """``w`` [out, in] reordered once into oneDNN's blocked layout (an mkldnn tensor, same
    shape and dtype, no grad): ``linear`` then skips the reorder oneDNN otherwise does on every
    call. The values are ``w``'s; only the summation order of a product may differ from the
    plain path's (float rounding, ~1e-6 relative)."""
    if not packable(w):
        raise ValueError(f"pack_linear_weight: not a packable weight ({w.dtype}, {tuple(w.shape)}, {w.device})")
    return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS_HINT), requires_grad=False)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``; x: [..., in], w: [out, in] -> [..., out].

    A packed weight (``pack_linear_weight``, an mkldnn tensor) goes through oneDNN's linear
    without a reorder. A plain one: on CPU, MKL's fp32 GEMV (batch-1 decode) streams weights
    at about half the memory bandwidth and ignores the second thread; oneDNN's reaches close
    to full bandwidth and is also 1.1-1.8x faster for 8-64 rows (measured on the 2-core AMD
    EPYC dev machine, see BENCHMARKS.md). Both compute the same fp32 dot products; only the
    summation order (float rounding, ~1e-6 relative) differs. Inference only: oneDNN's op has
    no autograd formula.
    """
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    if (
        ONEDNN_LINEAR
        and w.numel() >= ONEDNN_MIN_WEIGHT
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and not torch.is_grad_enabled()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


# KernelConfig.stream_linear_max_rows when left None, by the native build's vector paths
# (``simd_isa()``): the row count up to which streaming beat packed oneDNN in the engine's
# decode step (engine/config.py has the measurements; "portable" has no measurement of its own).
STREAM_ROWS_BY_ISA = {"avx512": 4, "avx2": 16, "portable": 4}


def stream_rows(module: ModuleType, configured: int | None) -> int:
    """The streaming cut for these kernels: ``configured``, or the ISA's default when None."""
    return STREAM_ROWS_BY_ISA[module.simd_isa()] if configured is None else configured


@dataclass(frozen=True)
class NativeKernels:
    """The compiled CPU kernels of engine/native (``csrc/linear.cpp``, ``csrc/fused_ops.cpp``)
    as the model calls them; a model without one runs the torch ops above and below.

    ``max_rows``: ``linear`` streams a plain weight once through ``stream_linear`` when x has at
    most this many rows (decode batches), and goes through ``linear`` (oneDNN / MKL) above it; 0
    never streams. Above it a weight with a packed copy in ``packed`` (keyed by the plain
    weight's ``id``; DecoderLM.prepack_linears) runs oneDNN on the copy; a packed weight
    (``pack_linear_weight``) always goes through oneDNN. The cut is a fixed number per build
    (``stream_rows``), not a per-call measurement, so the kernel a step uses (hence its
    rounding) depends only on the step's shape and the machine, never on timing noise: see
    ``benchmarks/linear_kernels.py`` for the measurements behind the defaults (KernelConfig).
    """

    module: ModuleType
    max_rows: int
    # id(plain weight) -> its oneDNN-packed copy; the model keeps the plain weights alive
    packed: dict[int, torch.Tensor] = field(default_factory=dict)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, in], w: [out, in] -> [T, out]."""
        # The native kernels after this linear run on the threads it used (ChunkPool.set_openmp):
        # the streaming kernel's pool, or OpenMP's after oneDNN.
        if x.shape[0] <= self.max_rows and w.dtype in _STREAM_DTYPES and not w.is_mkldnn:
            self.module.set_openmp(False)
            return self.module.stream_linear(x, w, b)
        self.module.set_openmp(True)
        return linear(x, self.packed.get(id(w), w), b)

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x: [T, hidden] -> norm(x), as ``RMSNorm.forward`` computes it."""
        return self.module.rms_norm(x, norm.weight, norm.eps)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x += delta (in place; x: [T, hidden] contiguous), then norm(x)."""
        return self.module.add_rms_norm(x, delta, norm.weight, norm.eps)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [N, V] fp32 -> int64 [N], the first index of each row's maximum."""
        return self.module.argmax_rows(logits)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: [T, 2I] -> silu(gate) * up [T, I]."""
        return self.module.silu_mul(gate_up)

    def rope_split_qkv(
        self, qkv: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor, heads: int, kv_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv: [T, (H + 2 Hkv) D] -> dense q [T, H, D], k [T, Hkv, D] (rotated), v [T, Hkv, D]."""
        q, k, v = self.module.rope_split_qkv(qkv, rope.cos, rope.sin, positions, heads, kv_heads)
        return q, k, v


_STREAM_DTYPES = (torch.float32, torch.bfloat16)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, for the supported rope scalings."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wl = rope.original_max_position / rope.low_freq_factor
        high_wl = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table [max_pos, head_dim].

    ``tables(positions)`` gathers the step's rows once; every layer then calls ``apply``.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        super().__init__()
        inv = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, sin), each [T, 1, head_dim] in ``dtype`` (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] -> rotated x (the same element-wise ops as Hugging Face)."""
        return x * cos + _rotate_half(x) * sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, D]; k: [T, Hkv, D]
        cos, sin = self.tables(positions, q.dtype)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are fused into one [2I, H] weight."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(hidden, intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down)

    def forward_native(self, x: torch.Tensor, k: NativeKernels) -> torch.Tensor:
        """``forward`` through the native kernels (x: [T, hidden])."""
        return k.linear(k.silu_mul(k.linear(x, self.gate_up)), self.down)
