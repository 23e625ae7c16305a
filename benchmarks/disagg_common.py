"""Pieces of the disaggregation benchmark (``disagg_latency.py``): model, cluster configs,
a streaming request driver that timestamps every token, the latency/goodput metrics, a
timing wrapper for the router's worker calls, and the markdown tables and plot.

Timing convention: every timestamp is ``time.perf_counter()`` in the driver process, taken
when ``Router.generate`` hands the driver a chunk. A chunk carrying k tokens gives all k
the same timestamp (k-1 inter-token gaps of 0, as a streaming client sees them).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from engine.request import SamplingParams
from engine.types import RequestSpec

# A random-weight Llama (engine.models.tiny, family "llama"): ~8M parameters outside the
# embedding, 8 KiB of KV per token (8 layers x K,V x 2 kv heads x 64 x fp32). On one core of
# the 2-core benchmark machine a 1500-token prefill takes ~0.9 s and a decode step over
# 1500-token contexts ~5 ms + ~14 ms per sequence, so long prompts and decodes are both
# expensive enough for phase interference to show.
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
TTFT_MODES = ("colocated", "disagg", "disagg-whole")  # names of the three controllers
LOAD_MODES = ("colocated", "disagg")
BLOCK_SIZE = 16
# Engine options per pool. Prefix caching is off so repeated benchmark prompts never hit it.
# The token budget (one prefill chunk) is the engine default, 2048, in every pool.
PREFILL_ENGINE = {"block_size": BLOCK_SIZE, "num_blocks": 1024, "enable_prefix_caching": False}
DECODE_ENGINE = {"block_size": BLOCK_SIZE, "num_blocks": 4096, "enable_prefix_caching": False}


def serve_config(model: str, topology: str, layerwise: bool = True, chunk: int = 2048) -> ServeConfig:
    """``topology``: "disagg" = 1 prefill + 1 decode worker (shm KV transfer);
    "colocated" = one mixed pool of 2 workers (each prefills and decodes its own requests).

    Every worker is a Ray actor with ``num_cpus=1`` (so torch runs 1 thread in it). Routing is
    JSQ on both sides, the short-prompt path is off (every request of the disagg topology is
    split) and role switching is off (the disagg decode worker never turns mixed)."""
    prefill = {**PREFILL_ENGINE, "max_num_batched_tokens": chunk}
    decode = {**DECODE_ENGINE, "max_num_batched_tokens": chunk}
    if topology == "disagg":
        pools = (
            PoolConfig("prefill", "prefill", 1, num_cpus=1.0, engine=prefill),
            PoolConfig("decode", "decode", 1, num_cpus=1.0, engine=decode),
        )
    elif topology == "colocated":
        pools = (PoolConfig("mixed", "mixed", 2, num_cpus=1.0, engine=decode),)
    else:
        raise ValueError(f"unknown topology {topology!r}")
    return ServeConfig(
        model=model,
        pools=pools,
        router=RouterConfig(prefill_policy="jsq", decode_policy="jsq", short_prompt_threshold=0, max_mixed_workers=0),
        transfer=TransferConfig(kind="shm", layerwise=layerwise, timeout_s=120.0),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        max_queue=4096,
    )


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # ids 0-2 are <pad>, <s>, </s>


@dataclass
class Trace:
    """One request as the driver saw it."""

    rid: str
    prompt_len: int
    sent: float = 0.0  # perf_counter when generate() was entered
    token_times: list[float] = field(default_factory=list)  # one per output token
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason == "length"

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def second_token(self) -> float:
        """Arrival -> second token: TTFT plus the KV hand-over (disagg) and one decode step."""
        return self.token_times[1] - self.sent

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (inf with fewer than 2 tokens)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else math.inf

    @property
    def end(self) -> float:
        return self.token_times[-1] if self.token_times else self.sent


async def run_request(router, rid: str, prompt: list[int], max_tokens: int) -> Trace:
    """Stream one greedy request of exactly ``max_tokens`` tokens through ``router``."""
    trace = Trace(rid, len(prompt))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    trace.sent = time.perf_counter()
    try:
        async for chunk in router.generate(RequestSpec(rid, prompt, params)):
            now = time.perf_counter()
            trace.chunks += 1
            trace.token_times += [now] * len(chunk.token_ids)
            if chunk.finished:
                trace.finish_reason, trace.error = chunk.finish_reason, chunk.error
    except Exception as e:  # a failed request is counted as failed, the run goes on
        trace.error = f"{type(e).__name__}: {e}"
    return trace


async def run_poisson(router, prompts: list[list[int]], gaps: list[float], max_tokens: int, tag: str) -> list[Trace]:
    """Send ``prompts[i]`` ``gaps[0] + ... + gaps[i]`` seconds after the start (open loop)."""
    t0 = time.perf_counter()
    tasks, at = [], 0.0
    for i, (prompt, gap) in enumerate(zip(prompts, gaps, strict=True)):
        at += gap
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run_request(router, f"{tag}-{i}", prompt, max_tokens)))
    return list(await asyncio.gather(*tasks))


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_load(segments: list[list[Trace]], rate: float, ttft_slo: float, tpot_slo: float) -> dict:
    """Latency percentiles and goodput of one topology at one rate, over its open-loop runs.

    SLO attainment = share of the requests that finished with TTFT <= ttft_slo and TPOT <=
    tpot_slo; goodput = offered rate x attainment (the rate of requests served within the SLOs;
    dividing by the wall time instead would credit short Poisson realisations and charge the
    drain). throughput = finished requests / summed wall time (each run: first send -> last
    token), which falls below the offered rate once the system cannot keep up."""
    traces = [t for seg in segments for t in seg]
    ok = [t for t in traces if t.ok]
    itls = [g for t in ok for g in t.itls]
    good = [t for t in ok if t.ttft <= ttft_slo and t.tpot <= tpot_slo]
    wall = sum(max(t.end for t in seg) - min(t.sent for t in seg) for seg in segments)
    return {
        "rate": rate,
        "requests": len(traces),
        "completed": len(ok),
        "errors": sorted({t.error for t in traces if t.error})[:3],
        "wall_s": wall,
        "ttft_p50_s": percentile([t.ttft for t in ok], 50),
        "ttft_p99_s": percentile([t.ttft for t in ok], 99),
        "tpot_mean_s": sum(t.tpot for t in ok) / len(ok) if ok else math.nan,
        "tpot_p99_s": percentile([t.tpot for t in ok], 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "itl_max_s": max(itls) if itls else math.nan,
        # share of inter-token gaps longer than the TPOT SLO (stalls a reader notices)
        "itl_over_slo_pct": 100 * sum(g > tpot_slo for g in itls) / len(itls) if itls else math.nan,
        "multi_token_chunks": sum(t.chunks < len(t.token_times) for t in ok),
        "slo_attainment": len(good) / len(traces),
        "goodput_rps": rate * len(good) / len(traces),
        "throughput_rps": len(ok) / wall,
    }


def trace_record(t: Trace, t0: float) -> dict:
    """Compact JSON form: times in ms, ``sent`` relative to the run start ``t0``."""
    return {
        "rid": t.rid,
        "prompt_len": t.prompt_len,
        "sent_ms": round(1e3 * (t.sent - t0), 1),
        "token_ms": [round(1e3 * (x - t.sent), 1) for x in t.token_times],
        "error": t.error,
    }


class TimedInvoker:
    """Wraps a worker handle's invoker and records how long each call took (driver side)."""

    def __init__(self, inner, kind: str, sink: dict):
        self.inner, self.kind, self.sink = inner, kind, sink

    async def invoke(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return await self.inner.invoke(fn, *args)
        finally:
            self.sink.setdefault(f"{self.kind}.{fn.__name__}", []).append(time.perf_counter() - t0)


def take_rpc_times(c) -> dict[str, dict]:
    """p50/p99/max ms of controller ``c``'s router calls since the last take (``c.rpc_times``,
    filled by TimedInvoker); reads are left out: they long-poll."""
    out = {
        k: {"n": len(v), "p50_ms": 1e3 * percentile(v, 50), "p99_ms": 1e3 * percentile(v, 99), "max_ms": 1e3 * max(v)}
        for k, v in sorted(c.rpc_times.items())
        if v and not k.endswith(".read")
    }
    c.rpc_times.clear()
    return out


# ---------------------------------------------------------------- report


def fmt_ms(s: float) -> str:
    return "n/a" if s is None or math.isnan(s) else f"{s * 1e3:.0f}"


def tables(ttft: dict, load: list[dict], args: argparse.Namespace) -> str:
    out = [
        "### TTFT, one request at a time",
        "",
        f"Median of {args.reps} rounds. Overhead vs colocated: median of the paired (same round) ratios; "
        "in brackets the ratio of the fastest samples.",
        "",
    ]
    out.append(
        "| prompt tokens | colocated TTFT ms | disagg layer-wise TTFT ms | overhead | disagg whole-cache TTFT ms "
        "| overhead | 2nd token ms: colocated / layer-wise / whole |"
    )
    out.append("|---:|---:|---:|---:|---:|---:|---|")
    for r in ttft["summary"]:
        c, lw, wh = r["colocated"], r["disagg"], r["disagg-whole"]
        out.append(
            f"| {r['prompt_len']} | {fmt_ms(c['ttft_median_s'])} | {fmt_ms(lw['ttft_median_s'])} "
            f"| {lw['ttft_overhead_pct']:+.1f} % ({lw['ttft_overhead_of_min_pct']:+.1f} %) | {fmt_ms(wh['ttft_median_s'])} "
            f"| {wh['ttft_overhead_pct']:+.1f} % ({wh['ttft_overhead_of_min_pct']:+.1f} %) "
            f"| {fmt_ms(c['second_token_median_s'])} / {fmt_ms(lw['second_token_median_s'])} / "
            f"{fmt_ms(wh['second_token_median_s'])} |"
        )
    out += [
        "",
        f"### Load: Poisson arrivals, prompts {args.prompt_len} +-20 % tokens, {args.output_len} output tokens",
        "",
    ]
    out.append(
        f"SLOs: TTFT <= {args.ttft_slo:g} s and TPOT <= {args.tpot_slo * 1e3:g} ms. "
        f"{args.requests} requests per rate and topology."
    )
    out.append("")
    out.append(
        "| rate req/s | topology | ok | TTFT p50 / p99 s | TPOT mean ms | ITL p50 ms | ITL p99 ms | ITL max ms "
        "| gaps > TPOT SLO | SLO met | goodput req/s | throughput req/s |"
    )
    out.append("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in load:
        if not s.get("routing_ok", True):
            out.append(f"| | (routes {s['route_reasons']}: not all as configured) |||||||||||")
        out.append(
            f"| {s['rate']:g} | {s['mode']} | {s['completed']}/{s['requests']} "
            f"| {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} | {fmt_ms(s['tpot_mean_s'])} | {fmt_ms(s['itl_p50_s'])} "
            f"| {fmt_ms(s['itl_p99_s'])} | {fmt_ms(s['itl_max_s'])} | {s['itl_over_slo_pct']:.1f} % "
            f"| {s['slo_attainment']:.0%} "
            f"| {s['goodput_rps']:.2f} | {s['throughput_rps']:.2f} |"
        )
    out += [
        "",
        "| rate req/s | P99 ITL ms colocated | P99 ITL ms disagg | colocated / disagg "
        "| goodput req/s colocated | goodput req/s disagg |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in args.rates:
        by = {s["mode"]: s for s in load if s["rate"] == rate}
        c, d = by["colocated"], by["disagg"]
        itl = c["itl_p99_s"] / d["itl_p99_s"] if d["itl_p99_s"] else math.nan
        out.append(
            f"| {rate:g} | {fmt_ms(c['itl_p99_s'])} | {fmt_ms(d['itl_p99_s'])} | {itl:.2f}x "
            f"| {c['goodput_rps']:.2f} | {d['goodput_rps']:.2f} |"
        )
    return "\n".join(out)


def plot(ttft: dict, load: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.6))
    lengths = [r["prompt_len"] for r in ttft["summary"]]
    width = 0.26
    labels = {"colocated": "colocated (mixed)", "disagg": "disagg layer-wise", "disagg-whole": "disagg whole-cache"}
    for k, m in enumerate(TTFT_MODES):
        med = [r[m]["ttft_median_s"] * 1e3 for r in ttft["summary"]]
        lo = [med[j] - r[m]["ttft_min_s"] * 1e3 for j, r in enumerate(ttft["summary"])]
        hi = [r[m]["ttft_max_s"] * 1e3 - med[j] for j, r in enumerate(ttft["summary"])]
        xs = [j + (k - 1) * width for j in range(len(lengths))]
        a1.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=labels[m])
    a1.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    a1.set_xlabel("prompt tokens")
    a1.set_ylabel("TTFT ms (median, min-max)")
    a1.set_title("TTFT, unloaded")
    a1.legend(fontsize=8)
    load_labels = {"colocated": "2 mixed workers (colocated)", "disagg": "1 prefill + 1 decode (disagg)"}
    for m, style in (("colocated", "o-"), ("disagg", "s-")):
        rows = [s for s in load if s["mode"] == m]
        rates = [s["rate"] for s in rows]
        a2.plot(rates, [s["itl_p99_s"] * 1e3 for s in rows], style, label=load_labels[m])
        a3.plot(rates, [s["goodput_rps"] for s in rows], style, label=load_labels[m])
    a2.set_yscale("log")
    a3.plot(args.rates, args.rates, ":", color="grey", label="offered rate")
    a2.set_xlabel("request rate (req/s)")
    a2.set_ylabel("P99 inter-token latency ms (log)")
    a2.set_title(f"P99 ITL, prompts ~{args.prompt_len}, {args.output_len} out")
    a3.set_xlabel("request rate (req/s)")
    a3.set_ylabel("goodput (req/s)")
    a3.set_title(f"goodput: TTFT<={args.ttft_slo:g}s, TPOT<={args.tpot_slo * 1e3:g}ms")
    for a in (a2, a3):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
