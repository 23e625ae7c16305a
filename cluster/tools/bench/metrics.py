"""Per-request timelines and the summary of a run, with ``vllm bench serve``'s field names.

Definitions (times in seconds on one monotonic clock; summaries in ms):
- TTFT: first token-carrying chunk received - request sent.
- E2E latency (``e2el``): last chunk received - request sent.
- TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one token.
- ITL: the gaps between consecutive token-carrying chunks, pooled over all requests. A chunk
  carrying k tokens (speculative decoding, batched streaming) is one gap, as in vllm.
- Goodput: successful requests meeting every given SLO (``ttft``, ``tpot``, ``e2el``, in ms;
  a request without a TPOT meets any TPOT SLO) per second of run time.
Percentiles interpolate linearly (numpy.percentile's default, which vllm uses too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestRecord:
    """One request's timeline. Lifecycle: created unsent; the client sets ``start``, appends a
    chunk per token-carrying message, then sets ``end`` and ``success`` (or ``error``)."""

    prompt_len: int  # tokens (the server's usage count when it reported one)
    expected_output: int  # max_tokens asked for
    start: float = 0.0  # time the request was sent
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in the chunk)
    end: float = 0.0  # time the stream ended
    output_len: int = 0  # tokens generated (server usage, else counted from the chunks)
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache served (None: not reported)
    success: bool = False
    error: str = ""

    def add_chunk(self, t: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.chunks.append((t, num_tokens))

    @property
    def token_times(self) -> list[float]:
        """Arrival time of every output token (tokens of one chunk share its time)."""
        return [t for t, k in self.chunks for _ in range(k)]

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.start if self.chunks else None

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_len < 2:
            return None
        return (self.e2el - ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        times = [t for t, _ in self.chunks]
        return [b - a for a, b in zip(times, times[1:])]


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput SLO {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if not (ms > 0 and math.isfinite(ms)):
            raise ValueError(f"goodput SLO {item!r}: must be a finite number of milliseconds > 0")
        if name in slos:
            raise ValueError(f"goodput SLO {name!r} given twice")
        slos[name] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el}
    for name, limit_ms in slos.items():
        v = values[name]
        if v is None:
            if name == "tpot":
                continue  # a single-token output has no TPOT to violate
            return False
        if v * 1000.0 > limit_ms:
            return False
    return True


def count_good(records: list[RequestRecord], slos: dict[str, float]) -> int:
    return sum(meets_slos(r, slos) for r in records)


def percentile_key(p: float, name: str) -> str:
    """vllm's key: 99 -> 'p99_ttft_ms', 99.9 -> 'p99.9_ttft_ms'."""
    return f"p{int(p) if p == int(p) else p}_{name}_ms"


def latency_stats(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """mean/median/std/p<X> of ``values_s`` in ms under vllm's keys (``mean_ttft_ms``, ...); 0 when empty."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    has = ms.size > 0
    out = {
        f"mean_{name}_ms": float(ms.mean()) if has else 0.0,
        f"median_{name}_ms": float(np.median(ms)) if has else 0.0,
        f"std_{name}_ms": float(ms.std()) if has else 0.0,
    }
    for p in percentiles:
        out[percentile_key(p, name)] = float(np.percentile(ms, p)) if has else 0.0
    return out


def peak_output_rate(records: list[RequestRecord], t0: float) -> float:
    """Most output tokens received within one whole second (bucketed from ``t0``)."""
    buckets: dict[int, int] = {}
    for r in records:
        for t, k in r.chunks:
            b = int((t - t0) // 1.0)
            buckets[b] = buckets.get(b, 0) + k
    return float(max(buckets.values(), default=0))


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once (sent, stream not yet ended)."""
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slos: dict[str, float] | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> dict:
    """The run's metrics dict (vllm-compatible keys), from every record sent in the run."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [g for r in ok for g in r.itls]
    e2els = [r.e2el for r in ok]
    good = count_good(records, slos) if slos else None
    result: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        # prompt tokens answered from the server's prefix cache (None: the server reports none)
        "cached_input_tokens": None
        if any(r.cached_tokens is None for r in ok)
        else sum(r.cached_tokens or 0 for r in ok),
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if good is not None else None,
        "good_requests": good,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": peak_output_rate(records, min((r.start for r in records), default=0.0)),
        "max_concurrent_requests": peak_concurrency(records),
        "percentiles": list(percentiles),
    }
    for name, values in zip(LATENCY_METRICS, (ttfts, tpots, itls, e2els)):
        result.update(latency_stats(name, values, percentiles))
    result.update(
        {
            "input_lens": [r.prompt_len for r in records],
            "output_lens": [r.output_len for r in records],
            "ttfts": [(r.ttft or 0.0) if r.success else 0.0 for r in records],
            "itls": [r.itls for r in records],
            "errors": [r.error for r in records],
        }
    )
    return result
