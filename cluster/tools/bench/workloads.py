"""What the benchmark sends: prompts and output lengths, optionally with arrival times.

Workload specs (``--workload``):

    fixed:IN:OUT            every prompt IN tokens, every output OUT tokens
    random:IN:OUT[:R]       lengths uniform in [x*(1-R), x*(1+R)] (R = range ratio, default 0.5)
    azure-code              lognormal lengths with the Azure 2023 code trace's moments
    azure-conv              the same for the conversation trace
    jsonl:PATH              one {"prompt": str | [ids], "output_tokens": N} object per line
                            (other keys, e.g. an attribution, are ignored; benchmarks/data/)
    trace:PATH              Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens): lengths
                            and arrival times, replayed in time

Synthetic prompts are token-id lists drawn uniformly from [1, vocab_size), so their length
is exact whatever the tokenizer. ``scale`` multiplies every synthetic length (mean and sd
alike), for machines that cannot serve the real sizes; lengths are rounded and at least 1.
The Azure moments (AzureLLMInferenceTrace 2023, CC BY 4.0; Patel et al., Splitwise, ISCA 2024):
code prompt 2048 +- 1973, output 28 +- 60; conversation prompt 1155 +- 1109, output 211 +- 163.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np


class WorkloadError(ValueError):
    """A workload spec or file that cannot be used; the message names the spec, file and line."""


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (synthetic workloads)
    prompt_len: int  # tokens; for text prompts an estimate until the server reports usage
    output_len: int  # max_tokens to ask for (with ignore_eos: exactly this many)
    arrival_s: float | None = None  # offset from the run's start (trace replay); None: the arrival process


@dataclass(frozen=True)
class LengthDist:
    """Lognormal with the given mean and standard deviation (moment-matched)."""

    mean: float
    sd: float

    def sample(self, n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
        sigma2 = math.log1p((self.sd / self.mean) ** 2)
        mu = math.log(self.mean * scale) - sigma2 / 2
        return np.maximum(np.rint(rng.lognormal(mu, math.sqrt(sigma2), n)), 1).astype(np.int64)


AZURE = {
    "azure-code": (LengthDist(2048.0, 1973.0), LengthDist(28.0, 60.0)),
    "azure-conv": (LengthDist(1155.0, 1109.0), LengthDist(211.0, 163.0)),
}
SPEC_HELP = "fixed:IN:OUT | random:IN:OUT[:RATIO] | azure-code | azure-conv | jsonl:PATH | trace:PATH"


@dataclass(frozen=True)
class Workload:
    """A parsed ``--workload`` spec; ``sample`` turns it into requests."""

    kind: str  # "fixed" | "random" | "azure-code" | "azure-conv" | "jsonl" | "trace"
    input_len: int = 0
    output_len: int = 0
    range_ratio: float = 0.0
    path: str = ""

    @property
    def timed(self) -> bool:
        """True when the requests carry their own arrival times (trace replay)."""
        return self.kind == "trace"

    def sample(
        self, n: int, rng: np.random.Generator, *, scale: float = 1.0, vocab_size: int = 256
    ) -> list[BenchRequest]:
        """``n`` requests (file workloads: the first ``n`` entries; JSONL cycles, traces stop at the end)."""
        if self.kind == "jsonl":
            if n < 1:
                raise WorkloadError(f"need at least one request, got {n}")
            entries = read_jsonl(self.path)
            return [entries[i % len(entries)] for i in range(n)]
        if vocab_size < 2:
            raise WorkloadError(f"vocab_size must be >= 2, got {vocab_size}")
        ins, outs, arrivals = self.sample_lengths(n, rng, scale)
        return [
            BenchRequest(rng.integers(1, vocab_size, p).tolist(), int(p), int(o), a)
            for p, o, a in zip(ins, outs, arrivals)
        ]

    def sample_lengths(
        self, n: int, rng: np.random.Generator, scale: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray, list[float | None]]:
        """(prompt lengths, output lengths, arrival offsets or None) of a synthetic or trace workload."""
        if n < 1:
            raise WorkloadError(f"need at least one request, got {n}")
        if not scale > 0:
            raise WorkloadError(f"scale must be > 0, got {scale}")
        if self.kind == "trace":
            rows = read_trace(self.path)[:n]
            ins = np.array([round_len(p * scale) for _, p, _ in rows])
            outs = np.array([round_len(o * scale) for _, _, o in rows])
            return ins, outs, [t for t, _, _ in rows]
        if self.kind in AZURE:
            pdist, odist = AZURE[self.kind]
            ins, outs = pdist.sample(n, rng, scale), odist.sample(n, rng, scale)
        elif self.kind in ("fixed", "random"):
            ins = _uniform(rng, self.input_len * scale, self.range_ratio, n)
            outs = _uniform(rng, self.output_len * scale, self.range_ratio, n)
        else:
            raise WorkloadError(f"{self.kind} workloads have no length distribution")
        return ins, outs, [None] * n


def round_len(x: float) -> int:
    return max(int(round(x)), 1)


def _uniform(rng: np.random.Generator, mean: float, ratio: float, n: int) -> np.ndarray:
    lo, hi = round_len(mean * (1 - ratio)), round_len(mean * (1 + ratio))
    return rng.integers(lo, hi + 1, n)


def parse_workload(spec: str) -> Workload:
    kind, _, rest = spec.partition(":")
    if kind in AZURE and not rest:
        return Workload(kind)
    if kind in ("jsonl", "trace"):
        if not rest:
            raise WorkloadError(f"workload {spec!r}: {kind} needs a path ({kind}:PATH)")
        return Workload(kind, path=rest)
    if kind in ("fixed", "random"):
        parts = rest.split(":")
        want = (2,) if kind == "fixed" else (2, 3)
        if len(parts) not in want:
            raise WorkloadError(f"workload {spec!r}: expected {kind}:IN:OUT{'[:RATIO]' if kind == 'random' else ''}")
        try:
            ins, outs = int(parts[0]), int(parts[1])
            ratio = float(parts[2]) if len(parts) == 3 else (0.5 if kind == "random" else 0.0)
        except ValueError:
            raise WorkloadError(f"workload {spec!r}: lengths must be integers and RATIO a number") from None
        if ins < 1 or outs < 1:
            raise WorkloadError(f"workload {spec!r}: lengths must be >= 1")
        if not 0 <= ratio < 1:
            raise WorkloadError(f"workload {spec!r}: RATIO must be in [0, 1), got {ratio}")
        return Workload(kind, ins, outs, ratio)
    raise WorkloadError(f"unknown workload {spec!r}; expected {SPEC_HELP}")


def clip_to_context(reqs: list[BenchRequest], max_model_len: int) -> tuple[list[BenchRequest], int]:
    """Shorten token-id requests so prompt + output < max_model_len; (requests, how many clipped).

    The output is cut to what the prompt leaves, but never below half the context (or its
    own length); the prompt gets the rest. Text prompts are
    left alone (their token count is the server's to decide).
    """
    budget = max_model_len - 1
    if budget < 2:
        raise WorkloadError(f"max_model_len {max_model_len} leaves no room for a prompt and an output")
    out, clipped = [], 0
    for r in reqs:
        if isinstance(r.prompt, str) or r.prompt_len + r.output_len <= budget:
            out.append(r)
            continue
        o = min(r.output_len, max(budget - r.prompt_len, budget // 2))
        p = min(r.prompt_len, budget - o)
        out.append(BenchRequest(r.prompt[:p], p, o, r.arrival_s))
        clipped += 1
    return out, clipped


# ---------------------------------------------------------------------------- files
def read_jsonl(path: str) -> list[BenchRequest]:
    """{"prompt": str | [int, ...], "output_tokens": N} per line; blank lines are skipped."""
    out: list[BenchRequest] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read {path}: {e}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected an object, got {type(obj).__name__}")
        prompt, n = obj.get("prompt"), obj.get("output_tokens")
        ids_ok = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) or ids_ok) or not prompt:
            raise WorkloadError(f"{where}: 'prompt' must be a non-empty string or list of token ids")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise WorkloadError(f"{where}: 'output_tokens' must be an integer >= 1, got {n!r}")
        # a text prompt's length is estimated at ~4 characters per token until the server reports it
        plen = len(prompt) if isinstance(prompt, list) else max(len(prompt) // 4, 1)
        out.append(BenchRequest(prompt, plen, n))
    if not out:
        raise WorkloadError(f"{path}: no requests")
    return out


TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_trace(path: str) -> list[tuple[float, int, int]]:
    """(seconds since the first row, prompt tokens, output tokens) per row, in file order.

    Rows must be sorted by time (the Azure files are). CRLF line ends and a missing final
    newline are fine.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise WorkloadError(f"cannot read {path}: {e}") from None
    if not rows or tuple(c.strip() for c in rows[0]) != TRACE_COLUMNS:
        raise WorkloadError(f"{path}: header must be {','.join(TRACE_COLUMNS)}, got {rows[0] if rows else 'nothing'}")
    out: list[tuple[float, int, int]] = []
    t0: datetime | None = None
    prev: datetime | None = None
    for no, row in enumerate(rows[1:], 2):
        if not row:
            continue
        where = f"{path}:{no}"
        if len(row) != 3:
            raise WorkloadError(f"{where}: expected 3 columns, got {len(row)}")
        try:
            t = datetime.fromisoformat(row[0].strip())
            p, o = int(row[1]), int(row[2])
        except ValueError as e:
            raise WorkloadError(f"{where}: {e}") from None
        if p < 1 or o < 1:
            raise WorkloadError(f"{where}: token counts must be >= 1, got {p}, {o}")
        if t0 is not None and (t.tzinfo is None) != (t0.tzinfo is None):
            raise WorkloadError(f"{where}: mixes timestamps with and without a UTC offset")
        if prev is not None and t < prev:
            raise WorkloadError(f"{where}: timestamps go backwards (rows must be sorted by time)")
        t0 = t if t0 is None else t0
        prev = t
        out.append(((t - t0).total_seconds(), p, o))  # differences of naive times: no zone or DST involved
    if not out:
        raise WorkloadError(f"{path}: no rows")
    return out
