"""When requests are sent: the load shape of one benchmark run.

Arrivals are a renewal process: gaps between sends are iid Gamma(shape=b, scale=1/(rate*b)),
so the mean gap is 1/rate and the coefficient of variation (sd / mean of the gaps) is
1/sqrt(b). ``b`` is the burstiness, as in ``vllm bench serve --burstiness``: b = 1 is a
Poisson process (exponential gaps, CV 1), b < 1 is burstier, b > 1 more regular. Rate
``inf`` sends everything at t = 0. The first request goes out at t = 0.

Bounds: a run sends at most ``num_requests`` requests and none scheduled at or after
``duration_s``; ``max_concurrency`` caps requests in flight (the rest wait client-side, and
their latencies count from when they were actually sent, as vllm does). ``warmup`` requests
run before the measured ones and are not recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # requests per second (mean); inf: all at once
    burstiness: float = 1.0  # gamma shape of the gaps; CV = 1/sqrt(burstiness)
    num_requests: int = 1000  # upper bound on measured requests sent
    duration_s: float | None = None  # no request is sent at or after this many seconds
    max_concurrency: int | None = None  # requests in flight at most (None: unbounded)
    warmup: int = 0  # unrecorded requests run (and awaited) before the measured ones
    trace_speedup: float = 1.0  # trace replay: arrival offsets are divided by this

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not (self.trace_speedup > 0 and math.isfinite(self.trace_speedup)):
            raise ValueError(f"trace_speedup must be a finite number > 0, got {self.trace_speedup}")

    @property
    def gap_cv(self) -> float:
        """Coefficient of variation of the gaps between sends."""
        return 1.0 / math.sqrt(self.burstiness)


def gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """n iid gaps (s): Gamma(shape=burstiness, scale=1/(rate*burstiness)); zeros for rate inf."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (s) of n requests: 0, then cumulative gaps. Shape [n], non-decreasing."""
    g = gaps(max(n - 1, 0), rate, burstiness, rng)
    return np.concatenate([[0.0], np.cumsum(g)])[:n]


def schedule(
    num: int, cfg: LoadConfig, rng: np.random.Generator, trace_offsets: list[float] | None = None
) -> np.ndarray:
    """Send offsets for the first ``num`` requests under ``cfg``'s bounds; length <= num.

    ``trace_offsets`` (trace replay) replaces the arrival process: shifted so the first is
    0 and divided by ``cfg.trace_speedup``. Offsets at or after ``duration_s`` are dropped.
    """
    n = min(num, cfg.num_requests)
    if trace_offsets is not None:
        t = np.asarray(trace_offsets[:n], dtype=np.float64)
        if len(t) and (np.diff(t) < 0).any():
            raise ValueError("trace arrival offsets must be non-decreasing")
        offsets = (t - (t[0] if len(t) else 0.0)) / cfg.trace_speedup
    else:
        offsets = arrival_times(n, cfg.request_rate, cfg.burstiness, rng)
    if cfg.duration_s is not None:
        offsets = offsets[offsets < cfg.duration_s]
    return offsets


def parse_rate(text: str) -> float:
    """'4' -> 4.0, 'inf' -> inf; raises ValueError for anything not > 0."""
    value = float(text)
    if not value > 0:
        raise ValueError(f"request rate must be > 0 or 'inf', got {text!r}")
    return value


def parse_rates(text: str) -> list[float]:
    """A sweep '1,2,4,inf' -> [1.0, 2.0, 4.0, inf], in the given order, no duplicates."""
    rates = [parse_rate(part.strip()) for part in text.split(",") if part.strip()]
    if not rates:
        raise ValueError(f"empty request-rate sweep {text!r}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"request-rate sweep {text!r} repeats a rate")
    return rates
