"""Step-time model: how long one engine step takes, from a profiled table.

A profile table (JSON, written by ``splitserve profile`` or by hand for other hardware)::

    {
      "format": "splitserve-profile/1",
      "illustrative": false,          # true: an estimate, not a measurement
      "source": "...",                # how the numbers were obtained
      "machine": {...}, "model": {"num_layers": L, "kv_bytes_per_token": B, ...},
      "engine": {"block_size": 16, "num_blocks": N, "max_num_batched_tokens": 2048,
                 "max_num_seqs": 256, ...},
      "prefill": {"tokens": [t0 < t1 < ...], "step_s": [...]},        # one fresh prompt of t tokens
      "decode": {"batch_sizes": [b0 < ...], "context_lens": [c0 < ...],
                 "step_s": [[...] per batch size, one per context length]}
    }

``StepTimeModel.step_time`` of a step that computes prefill chunks ``n_i`` (after ``ctx_i``
tokens already in the cache) and ``D`` decode tokens over contexts summing to ``S``:

- no prefill: ``decode(D, S / D)``, bilinear in the decode table;
- otherwise ``prefill(T) - c T^2 + c * sum(n_i^2 + 2 n_i ctx_i) + decode(D, S/D) -
  decode(D, c0)`` with ``T = P + D`` tokens in the step, ``P = sum(n_i)``: the prefill table
  for T tokens with its quadratic (causal attention) part ``c T^2`` replaced by the
  attention the step really does, ``c`` fitted to the prefill table by least squares
  (clipped at 0), plus the decode attention cost above the smallest profiled context
  ``c0``. One fresh chunk gives back ``prefill(n)`` exactly; several short prompts in one
  step cost less than one long prompt of the same total, as attention is per sequence.
  Never below half the fastest profiled step.

Calibration (defaults: none): ``time_scale`` multiplies every step time; ``token_overhead_s``
adds a serving cost per decoding request per step (the worker streaming each token).

Interpolation is piecewise linear; beyond the largest profiled point it extrapolates along
the last segment (never decreasing); below the smallest it holds the first value.
"""

from __future__ import annotations

import json
import math
import os
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PROFILE_FORMAT = "splitserve-profile/1"


def _increasing(name: str, xs: Sequence[float]) -> None:
    if len(xs) < 1 or any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"{name} must be a non-empty strictly increasing list, got {list(xs)}")


def _positive(name: str, xs: Sequence[float]) -> None:
    if any(not (x > 0 and math.isfinite(x)) for x in xs):
        raise ValueError(f"{name} must hold finite positive seconds, got {list(xs)}")


@dataclass(frozen=True)
class ProfileTable:
    """A validated profile table; ``to_json``/``from_json`` round-trip it."""

    prefill_tokens: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_batch_sizes: tuple[int, ...]
    decode_context_lens: tuple[int, ...]
    decode_s: tuple[tuple[float, ...], ...]  # [batch size][context length]
    num_layers: int
    kv_bytes_per_token: int  # K and V of every layer for one token
    block_size: int = 16
    num_blocks: int = 1024  # KV blocks of one instance
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    illustrative: bool = False
    source: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # free-form description, plus the two fields above
    engine: dict[str, Any] = field(default_factory=dict)  # free-form, plus the four fields above

    def __post_init__(self) -> None:
        _increasing("prefill.tokens", self.prefill_tokens)
        if len(self.prefill_s) != len(self.prefill_tokens):
            raise ValueError("prefill.step_s must have one entry per prefill.tokens")
        _positive("prefill.step_s", self.prefill_s)
        _increasing("decode.batch_sizes", self.decode_batch_sizes)
        _increasing("decode.context_lens", self.decode_context_lens)
        if self.prefill_tokens[0] < 1 or self.decode_batch_sizes[0] < 1 or self.decode_context_lens[0] < 1:
            raise ValueError("token counts, batch sizes and context lengths must be >= 1")
        if len(self.decode_s) != len(self.decode_batch_sizes) or any(
            len(row) != len(self.decode_context_lens) for row in self.decode_s
        ):
            raise ValueError(
                f"decode.step_s must be {len(self.decode_batch_sizes)} rows (batch sizes) of "
                f"{len(self.decode_context_lens)} values (context lengths)"
            )
        for row in self.decode_s:
            _positive("decode.step_s", row)
        for name in ("num_layers", "kv_bytes_per_token", "block_size", "num_blocks", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "illustrative": self.illustrative,
            "source": self.source,
            "machine": dict(self.machine),
            "model": {**self.model, "num_layers": self.num_layers, "kv_bytes_per_token": self.kv_bytes_per_token},
            "engine": {
                **self.engine,
                "block_size": self.block_size,
                "num_blocks": self.num_blocks,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "max_num_seqs": self.max_num_seqs,
            },
            "prefill": {"tokens": list(self.prefill_tokens), "step_s": list(self.prefill_s)},
            "decode": {
                "batch_sizes": list(self.decode_batch_sizes),
                "context_lens": list(self.decode_context_lens),
                "step_s": [list(r) for r in self.decode_s],
            },
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ProfileTable:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a profile table: format is {data.get('format')!r}, expected {PROFILE_FORMAT!r}")
        try:
            model, engine, pre, dec = data["model"], data["engine"], data["prefill"], data["decode"]
            return ProfileTable(
                prefill_tokens=tuple(int(t) for t in pre["tokens"]),
                prefill_s=tuple(float(s) for s in pre["step_s"]),
                decode_batch_sizes=tuple(int(b) for b in dec["batch_sizes"]),
                decode_context_lens=tuple(int(c) for c in dec["context_lens"]),
                decode_s=tuple(tuple(float(s) for s in row) for row in dec["step_s"]),
                num_layers=int(model["num_layers"]),
                kv_bytes_per_token=int(model["kv_bytes_per_token"]),
                block_size=int(engine.get("block_size", 16)),
                num_blocks=int(engine.get("num_blocks", 1024)),
                max_num_batched_tokens=int(engine.get("max_num_batched_tokens", 2048)),
                max_num_seqs=int(engine.get("max_num_seqs", 256)),
                illustrative=bool(data.get("illustrative", False)),
                source=str(data.get("source", "")),
                machine=dict(data.get("machine", {})),
                model={k: v for k, v in model.items() if k not in ("num_layers", "kv_bytes_per_token")},
                engine={
                    k: v
                    for k, v in engine.items()
                    if k not in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs")
                },
            )
        except KeyError as e:
            raise ValueError(f"profile table is missing the field {e.args[0]!r}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @staticmethod
    def load(path: str | os.PathLike[str]) -> ProfileTable:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: invalid JSON: {e}") from e
        return ProfileTable.from_json(data)


class _Interp1:
    """Piecewise-linear y(x): holds y[0] below x[0], extrapolates the last segment (slope >= 0).

    Piece ``j + 1`` (j = -1 .. len(xs) - 1) covers ``xs[j] <= x < xs[j + 1]`` (unbounded at
    the ends) where ``y = a[j + 1] + b[j + 1] * x``.
    """

    __slots__ = ("xs", "a", "b")

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        self.xs = list(xs)
        a, b = [float(ys[0])], [0.0]
        for j in range(len(xs) - 1):
            slope = (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
            a.append(ys[j] - slope * xs[j])
            b.append(slope)
        hi = max(0.0, b[-1]) if len(xs) > 1 else 0.0
        a.append(ys[-1] - hi * xs[-1])
        b.append(hi)
        self.a, self.b = a, b

    def __call__(self, x: float) -> float:
        p = bisect_right(self.xs, x)
        return self.a[p] + self.b[p] * x

    def run_sum(self, x0: float, n: int) -> float:
        """sum(y(x0 + k) for k in range(n)), in O(pieces crossed)."""
        if n <= 0:
            return 0.0
        xs, a, b = self.xs, self.a, self.b
        p, p_last = bisect_right(xs, x0), bisect_right(xs, x0 + n - 1)
        if p == p_last:
            return n * (a[p] + b[p] * x0) + b[p] * n * (n - 1) / 2
        total, k = 0.0, 0
        while k < n:
            # k_end: first k with x0 + k >= xs[p] (the start of the next piece)
            k_end = n if p >= len(xs) else min(n, max(k, math.ceil(xs[p] - x0)))
            cnt = k_end - k
            if cnt > 0:
                total += cnt * (a[p] + b[p] * x0) + b[p] * (k + k_end - 1) * cnt / 2
            k = k_end
            p += 1
        return total


def _fit_quadratic(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares c of y ~ a + b x + c x^2 (0 with fewer than 3 points), clipped at 0."""
    if len(xs) < 3:
        return 0.0
    import numpy as np

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    scale = x.max()
    coeffs = np.polyfit(x / scale, y, 2)  # highest power first; scaled for conditioning
    return max(0.0, float(coeffs[0]) / float(scale) ** 2)


def _isotonic(ys: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``ys`` in least squares (pool adjacent
    violators): a noisy dip or spike is averaged with its neighbours, not propagated."""
    blocks: list[list[float]] = []  # [sum, count]
    for y in ys:
        blocks.append([float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out += [s / n] * int(n)
    return out


class StepTimeModel:
    """Seconds per engine step, interpolated from a ProfileTable (see module docstring).

    Measured tables are noisy; the model makes them non-decreasing first (more tokens, a
    larger batch or a longer context never make a step faster) by isotonic regression:
    prefill times, every decode row, then every decode column.
    """

    def __init__(self, table: ProfileTable, time_scale: float = 1.0, token_overhead_s: float = 0.0):
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if token_overhead_s < 0:
            raise ValueError(f"token_overhead_s must be >= 0, got {token_overhead_s}")
        self.table = table
        # Calibration of a table to a serving setup, both from measurements of that setup:
        # every step time x time_scale (e.g. a CPU shared with other processes), plus
        # token_overhead_s per decoding request per step (streaming each token to its reader:
        # publish, RPC reply, in the worker's process).
        self.time_scale = time_scale
        self.token_overhead_s = token_overhead_s
        pre = [s * time_scale for s in _isotonic(table.prefill_s)]
        self._prefill = _Interp1(table.prefill_tokens, pre)
        self.quad = _fit_quadratic(table.prefill_tokens, pre)
        rows = [[s * time_scale for s in _isotonic(r)] for r in table.decode_s]
        for j in range(len(table.decode_context_lens)):
            col = _isotonic([r[j] for r in rows])
            for i, r in enumerate(rows):
                r[j] = col[i]
        self._bs = list(table.decode_batch_sizes)
        self._weights: dict[float, tuple[int, float, int, float]] = {}  # batch -> _batch_weights
        self._rows = [_Interp1(table.decode_context_lens, r) for r in rows]
        self._c0 = table.decode_context_lens[0]
        self._floor = 0.5 * min(min(pre), min(min(r) for r in rows))

    def prefill(self, tokens: float) -> float:
        """One fresh prompt of ``tokens`` tokens (the table, interpolated)."""
        return self._prefill(tokens)

    def _batch_weights(self, batch: float) -> tuple[int, float, int, float]:
        """decode(batch, x) = w0 * row[i0](x) + w1 * row[i1](x): linear in the batch size,
        held below the first, extrapolated past the last (proportional with a single row)."""
        w = self._weights.get(batch)
        if w is None:
            w = self._weights[batch] = self._compute_weights(batch)
        return w

    def _compute_weights(self, batch: float) -> tuple[int, float, int, float]:
        bs = self._bs
        if len(bs) == 1:
            return 0, max(1.0, batch / bs[0]), 0, 0.0
        if batch <= bs[0]:
            return 0, 1.0, 0, 0.0
        i = min(bisect_right(bs, batch), len(bs) - 1)
        alpha = (batch - bs[i - 1]) / (bs[i] - bs[i - 1])
        return i - 1, 1.0 - alpha, i, alpha

    def decode(self, batch: float, context: float) -> float:
        """One decode step of ``batch`` sequences with mean context ``context``."""
        i0, w0, i1, w1 = self._batch_weights(batch)
        y = w0 * self._rows[i0](context) + batch * self.token_overhead_s
        if w1:
            y += w1 * self._rows[i1](context)
        return y

    def decode_run(self, batch: int, context: float, steps: int) -> float:
        """Seconds of ``steps`` decode steps of ``batch`` sequences whose mean context is
        ``context`` in the first step and one more in each following step (O(table))."""
        i0, w0, i1, w1 = self._batch_weights(batch)
        t = w0 * self._rows[i0].run_sum(context, steps) + steps * batch * self.token_overhead_s
        if w1:
            t += w1 * self._rows[i1].run_sum(context, steps)
        return t

    def decode_steps_within(self, batch: int, context: float, steps: int, elapsed: float) -> int:
        """How many whole steps of such a run (at most ``steps``) end within ``elapsed`` seconds."""
        if elapsed <= 0:
            return 0
        # step times change slowly along a run: estimate from the first, then walk
        k = min(steps, int(elapsed / self.decode(batch, context)))
        t = self.decode_run(batch, context, k)
        while k > 0 and t > elapsed:
            k -= 1
            t -= self.decode(batch, context + k)
        while k < steps:
            nxt = t + self.decode(batch, context + k)
            if nxt > elapsed:
                break
            t, k = nxt, k + 1
        return k

    def step_time(self, prefill_tokens: int, prefill_quad: float, num_decode: int, decode_ctx_sum: int) -> float:
        """Seconds of one step. ``prefill_quad`` = sum over prefill chunks of n^2 + 2 n ctx."""
        if prefill_tokens == 0:
            if num_decode == 0:
                return 0.0
            return self.decode(num_decode, decode_ctx_sum / num_decode)
        total = prefill_tokens + num_decode
        t = self._prefill(total) + self.quad * (prefill_quad - total * total)
        t += num_decode * self.token_overhead_s
        if num_decode:
            ctx = decode_ctx_sum / num_decode
            t += max(0.0, self.decode(num_decode, ctx) - self.decode(num_decode, self._c0))
        return max(t, self._floor)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.table.kv_bytes_per_token

    @property
    def num_layers(self) -> int:
        return self.table.num_layers
