"""Workloads for the simulator: request arrival times and prompt/output lengths.

Sources:
- the Azure LLM inference traces (2023; CC BY 4.0): ``load_trace("code")`` and
  ``load_trace("conversation")`` read the excerpts shipped in ``cluster/tools/sim/data`` (the
  first 500 requests of each, see the README there); ``load_trace(path)`` reads a full
  trace file with the same columns (``TIMESTAMP,ContextTokens,GeneratedTokens``; TIMESTAMP
  either ``YYYY-MM-DD HH:MM:SS.fff`` or seconds);
- ``poisson(trace, rate, ...)``: Poisson arrivals at ``rate`` req/s, (prompt, output) pairs
  drawn jointly with replacement from a trace, seeded;
- ``fixed(...)``: constant lengths and a constant or Poisson arrival process (tests).

A ``Workload`` is plain data: arrivals in seconds from 0, non-decreasing; every prompt and
output length >= 1 (output counts the first token, produced by the prefill).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SHIPPED: dict[str, str] = {
    "code": "azure_code_500.csv",
    "conversation": "azure_conv_500.csv",
    "conv": "azure_conv_500.csv",
}


@dataclass(frozen=True)
class Workload:
    name: str
    arrival_s: tuple[float, ...]
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_lens) != n or len(self.output_lens) != n:
            raise ValueError(f"workload {self.name!r}: arrival_s, prompt_lens and output_lens differ in length")
        if any(b < a for a, b in zip(self.arrival_s, self.arrival_s[1:])):
            raise ValueError(f"workload {self.name!r}: arrival times must be non-decreasing")
        if n and self.arrival_s[0] < 0:
            raise ValueError(f"workload {self.name!r}: arrival times must be >= 0")
        for what, xs in (("prompt", self.prompt_lens), ("output", self.output_lens)):
            bad = next((x for x in xs if x < 1), None)
            if bad is not None:
                raise ValueError(f"workload {self.name!r}: {what} lengths must be >= 1, got {bad}")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return self.arrival_s[-1] - self.arrival_s[0] if self.arrival_s else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the arrival window (0 for fewer than 2 requests)."""
        return (len(self) - 1) / self.duration_s if len(self) > 1 and self.duration_s > 0 else 0.0

    def head(self, n: int) -> Workload:
        return Workload(self.name, self.arrival_s[:n], self.prompt_lens[:n], self.output_lens[:n])

    def clipped(self, max_prompt: int | None = None, max_output: int | None = None) -> Workload:
        """Lengths capped at ``max_prompt`` / ``max_output`` (e.g. to fit a small model's context)."""
        p = self.prompt_lens if max_prompt is None else tuple(min(x, max_prompt) for x in self.prompt_lens)
        o = self.output_lens if max_output is None else tuple(min(x, max_output) for x in self.output_lens)
        return Workload(self.name, self.arrival_s, p, o)

    def scaled_lengths(self, prompt_factor: float = 1.0, output_factor: float = 1.0) -> Workload:
        """Lengths multiplied by the factors (rounded, at least 1): a trace's shape on a smaller model."""
        p = tuple(max(1, round(x * prompt_factor)) for x in self.prompt_lens)
        o = tuple(max(1, round(x * output_factor)) for x in self.output_lens)
        return Workload(self.name, self.arrival_s, p, o)

    def at_rate(self, rate: float) -> Workload:
        """The same arrival pattern time-scaled to a mean of ``rate`` req/s."""
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if self.mean_rate == 0:
            raise ValueError(f"workload {self.name!r} has no arrival rate to rescale")
        k = self.mean_rate / rate
        t0 = self.arrival_s[0]
        return Workload(self.name, tuple((t - t0) * k for t in self.arrival_s), self.prompt_lens, self.output_lens)


def _parse_time(text: str) -> tuple[int, float]:
    """(day, seconds into the day) of ``YYYY-MM-DD HH:MM:SS[.f...]`` (any number of fraction
    digits), or (0, seconds) of a plain number. Kept apart so differences stay exact."""
    text = text.strip()
    if "-" not in text[1:]:
        return 0, float(text)
    date, _, clock = text.partition(" ")
    h, m, s = clock.split(":")
    return dt.date.fromisoformat(date).toordinal(), int(h) * 3600.0 + int(m) * 60.0 + float(s)


def trace_path(source: str) -> Path:
    """The shipped excerpt for a name in SHIPPED, else ``source`` as a file path."""
    if source in SHIPPED:
        return DATA_DIR / SHIPPED[source]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no trace {source!r}: not one of {sorted(SHIPPED)} and not a file")
    return path


def load_trace(source: str | os.PathLike[str], limit: int | None = None) -> Workload:
    """A trace CSV as a Workload (arrivals shifted to start at 0, sorted)."""
    path = trace_path(os.fspath(source))
    rows: list[tuple[tuple[int, float], int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            try:
                rows.append((_parse_time(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except ValueError as e:
                raise ValueError(f"{path}: row {i + 2}: {e}") from e
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    day0, sec0 = rows[0][0]
    name = path.stem if os.fspath(source) not in SHIPPED else os.fspath(source)
    return Workload(
        name,
        tuple((day - day0) * 86400.0 + (sec - sec0) for (day, sec), _, _ in rows),
        tuple(max(1, r[1]) for r in rows),
        tuple(max(1, r[2]) for r in rows),
    )


def poisson(
    trace: Workload,
    rate: float,
    duration_s: float | None = None,
    num_requests: int | None = None,
    seed: int = 0,
) -> Workload:
    """Poisson arrivals at ``rate`` req/s until ``duration_s`` or ``num_requests`` (the first
    reached), each request's (prompt, output) pair drawn with replacement from ``trace``."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if duration_s is None and num_requests is None:
        raise ValueError("give duration_s or num_requests")
    if len(trace) == 0:
        raise ValueError(f"trace {trace.name!r} is empty")
    rng = random.Random(seed)
    n_max = num_requests if num_requests is not None else 1 << 62
    t, arrivals, prompts, outputs = 0.0, [], [], []
    pairs = list(zip(trace.prompt_lens, trace.output_lens))
    while len(arrivals) < n_max:
        t += rng.expovariate(rate)
        if duration_s is not None and t > duration_s:
            break
        p, o = pairs[rng.randrange(len(pairs))]
        arrivals.append(t)
        prompts.append(p)
        outputs.append(o)
    return Workload(f"{trace.name}@poisson{rate:g}", tuple(arrivals), tuple(prompts), tuple(outputs))


def fixed(
    num_requests: int,
    prompt_len: int,
    output_len: int,
    rate: float | None = None,
    poisson_arrivals: bool = False,
    seed: int = 0,
) -> Workload:
    """``num_requests`` identical requests: all at t=0 (rate None), evenly spaced at ``rate``,
    or Poisson at ``rate``."""
    if rate is None:
        arrivals = [0.0] * num_requests
    elif poisson_arrivals:
        rng = random.Random(seed)
        t, arrivals = 0.0, []
        for _ in range(num_requests):
            t += rng.expovariate(rate)
            arrivals.append(t)
    else:
        arrivals = [i / rate for i in range(num_requests)]
    return Workload(
        f"fixed-{prompt_len}x{output_len}",
        tuple(arrivals),
        (prompt_len,) * num_requests,
        (output_len,) * num_requests,
    )
