"""Greedy tokens from a float32 head without the full float32 product: screen, then refine.

A decode step's head (vocab x hidden, 49152 x 576 on SmolLM2: 113 MB of float32) is a fifth of
the weight bytes a batch-1 step streams and, at 64 rows, 8 of the step's 66 ms. A step whose
rows are all plain greedy (no logprobs) needs only each row's argmax, so ``GreedyHead``:

1. **screens** with a bfloat16 copy of the head (half the bytes, and oneDNN's bf16 GEMM runs
   at twice the float32 rate on AVX512-BF16): ``Lt = x @ bf16(W).T`` [N, V];
2. **bounds** how far each screened logit can be from the float32 one, rigorously (below), so
   every token that can still be the float32 argmax of row n is a *candidate*:
   ``Lt[n, v] >= max_v Lt[n] - 2 B[n]``;
3. **refines**: the candidates' float32 logits ``x[n] . W[v]`` (a handful per row: 2-3 on
   average on SmolLM2 through the streaming kernel, ~20 through oneDNN; BENCHMARKS.md) and
   returns each row's argmax among them, lowest token id first on a tie (torch.argmax's rule).

The answer is therefore the float32 argmax, computed by a different summation order than the
full float32 product (so a near-tie below float32 rounding, ~1e-5 of a logit, may resolve the
other way: the same freedom oneDNN's row-count-dependent kernels already have).

**The bound.** With ``Wb = bf16(W)`` and ``R = W - Wb`` (exact in float32), for row x:

- streaming path (``x`` stays float32; native ``stream_linear`` reads bf16 weights and
  accumulates in float32): ``|Lt_v - W_v.x| <= |R_v.x| + acc <= (a + g b) |x|``;
- oneDNN path (``xb = bf16(x)``, ``dx = x - xb``, float32 accumulation, the result rounded to
  bf16): ``|Lt_v - W_v.x| <= a |x| + b |dx| + g b |xb| + u |acc_v|``,

where ``a = max_v |R_v|``, ``b = max_v |Wb_v|`` (2-norms, taken once at build; Cauchy-Schwarz),
``g = 2 H 2^-24`` bounds float32 accumulation over H terms, and ``u = 2^-8`` is bf16's unit
round-off. For a candidate ``|acc_v| <= |m| + 2B`` (m: the row's screened maximum), so
``B = (B_in + u' |m|) / (1 - 2u')`` with ``u' = u (1 + 2^-7)``. A final factor of 1.01 covers the
float32 rounding of the bound itself. If v* is the true argmax and m = Lt[u], then
``Lt[v*] >= W_v*.x - B >= W_u.x - B >= Lt[u] - 2B``: v* is a candidate.

Built for a float32 head on CPU with the native kernels built. Where oneDNN does not run bf16
natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported`` false: AVX2 machines, AVX-512 without
BF16), only steps the streaming kernel screens (rows <= max_rows) use it and larger ones take
the full float32 head (``tokens`` returns None); a model that
runs no native layers (MoE, q/k norm) gets NativeKernels for its head alone (ModelRunner); a non-finite screened maximum (NaN or inf
logits), or more than ``MAX_CANDIDATES_PER_ROW`` candidates a row, makes the caller compute the
full float32 logits instead (``tokens`` returns None). The kernel compares in float32 (bf16
widens exactly), so the candidates are exactly the ones the bound keeps. (Not covered: products
below 1e-38 that a bf16 dot product flushes to zero, at most H x 1e-38 per logit.)
Memory: two bf16 copies of the head (plain for the streaming kernel, oneDNN-packed), one
float32 head's worth in all; the plain one alone without oneDNN bf16. Lifecycle: built once by the ModelRunner after the weights are
loaded (``GreedyHead.build``); read-only afterwards.
"""

from __future__ import annotations

import torch

from engine.models.layers import PACK_ROWS_HINT, NativeKernels

_U = 2.0**-8  # bf16 unit round-off (8 significant bits, round to nearest)
_U_OUT = _U * (1 + 2.0**-7)
_SLACK = 1.01  # the bound's own float32 arithmetic
# above this many candidates in a row the refinement's weight rows cost more than the full
# product saves: ``tokens`` returns None (the full float32 logits)
MAX_CANDIDATES_PER_ROW = 2048


class GreedyHead:
    """Argmax of ``x @ W.T`` per row, screened in bf16 and refined in float32 (module docstring)."""

    def __init__(
        self, w: torch.Tensor, native: NativeKernels, restore_openmp: bool = False, onednn_bf16: bool | None = None
    ):
        """w: the plain float32 head [V, H] (kept by reference: the refinement reads it).
        ``restore_openmp``: the model runs no native kernels of its own (MoE, q/k-norm layers),
        so after a streamed screen the native kernels go back to torch's OpenMP threads, the
        default its torch ops need (ChunkPool.set_openmp; NativeKernels.linear).
        ``onednn_bf16``: screen steps above ``native.max_rows`` with oneDNN's bf16 GEMM (None:
        where oneDNN runs bf16 natively); False: those steps take the full head."""
        if onednn_bf16 is None:
            onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        self.w = w.detach().contiguous()
        self.native = native
        self.restore_openmp = restore_openmp
        self._module = native.module
        wb = w.detach().to(torch.bfloat16).contiguous()
        self.w_bf16 = wb  # [V, H] plain: the streaming kernel's
        # oneDNN's (blocked layout), for steps above max_rows; None: they take the full head
        self.w_bf16_packed = torch.ops.mkldnn._reorder_linear_weight(wb, PACK_ROWS_HINT) if onednn_bf16 else None
        wbf = wb.float()
        self.a = float((w.detach() - wbf).norm(dim=1).max())  # max_v |R_v|
        self.b = float(wbf.norm(dim=1).max())  # max_v |Wb_v|
        self.g = 2.0 * w.shape[1] * 2.0**-24
        # rows screened and candidates refined by ``tokens`` so far (benchmarks and tests read them)
        self.rows = 0
        self.candidates = 0

    @staticmethod
    def build(w: torch.Tensor, native: NativeKernels | None, restore_openmp: bool = False) -> GreedyHead | None:
        """A GreedyHead for head ``w``, or None where it does not apply (module docstring)."""
        if (
            native is None  # the refinement is a native kernel
            or w.is_mkldnn
            or w.dtype != torch.float32
            or w.device.type != "cpu"
            or w.dim() != 2
            or (native.max_rows == 0 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())  # no screen at all
        ):
            return None
        return GreedyHead(w, native, restore_openmp)

    def _screen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, H] fp32 -> (screened logits [N, V] (fp32 or bf16), bound B [N] fp32)."""
        s = x.norm(dim=1)
        native = self.native
        if x.shape[0] <= native.max_rows:
            native.module.set_openmp(False)  # the streaming kernel's pool (NativeKernels.linear)
            logits = native.module.stream_linear(x, self.w_bf16, None)  # fp32, x not rounded
            if self.restore_openmp:
                native.module.set_openmp(True)
            return logits, (self.a + self.g * self.b) * s
        assert self.w_bf16_packed is not None, "tokens() takes the full head above max_rows without oneDNN bf16"
        native.module.set_openmp(True)
        xb = x.to(torch.bfloat16)
        t = (x - xb.float()).norm(dim=1)
        logits = torch.ops.mkldnn._linear_pointwise(xb, self.w_bf16_packed, None, "none", [], "")  # bf16
        b_in = self.a * s + self.b * t + self.g * self.b * xb.float().norm(dim=1)
        return logits, b_in  # the output rounding is added in ``tokens`` (needs the maximum)

    @torch.inference_mode()
    def tokens(self, x: torch.Tensor) -> list[int] | None:
        """x: [N, H] fp32 (the final-normed hidden rows) -> each row's float32 argmax token, or
        None when a row's screened maximum is not finite, the rows are too flat to screen, or
        there are more than max_rows of them without oneDNN bf16 (the caller takes the full logits)."""
        if x.shape[0] > self.native.max_rows and self.w_bf16_packed is None:
            return None  # no bf16 GEMM to screen this many rows with
        x = x.contiguous()
        logits, bound = self._screen(x)
        out_round = _U_OUT if logits.dtype != torch.float32 else 0.0
        got = self._module.greedy_refine(logits, bound, out_round, _SLACK, x, self.w, MAX_CANDIDATES_PER_ROW)
        tokens, counts = got[0], got[1]
        if bool((tokens < 0).any()):
            return None
        self.rows += x.shape[0]
        self.candidates += int(counts.sum())
        return tokens.tolist()
