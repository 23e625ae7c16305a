"""Drives a benchmark: workload -> warm-up -> one timed run per request rate -> result dicts.

Lifecycle of ``run_bench``: ask the server for its model info (vocabulary size and context
length, used to draw and clip synthetic prompts), sample the workload once, run the warm-up
requests (shaped like the first measured ones with fresh random prompts; unmeasured,
reported apart; any failure aborts the benchmark: a server that cannot
answer them would only produce a table of errors), then for each rate send the requests on
the arrival schedule and summarise them. Each result dict has ``vllm bench serve``'s keys
plus the run's configuration, the warm-up's summary and the prompt tokens the server's
prefix cache answered.

Every rate of a sweep sends the same lengths and output lengths, but synthetic prompts
(token ids drawn from the server's vocabulary) get fresh contents per rate: replaying the same prompts would let the server's
prefix cache answer most of the prefill from the second rate on, and TTFT would fall as
the rate rises. Text prompts (jsonl) cannot be redrawn: they repeat, and
``cached_input_tokens`` shows how much the cache answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
from tqdm import tqdm

from cluster.tools.bench.arrivals import LoadConfig, schedule
from cluster.tools.bench.clients import BenchClient
from cluster.tools.bench.metrics import DEFAULT_PERCENTILES, RequestRecord, summarize
from cluster.tools.bench.workloads import BenchRequest, Workload, clip_to_context

log = logging.getLogger(__name__)
DEFAULT_VOCAB = 256  # synthetic ids below this exist in every byte-level BPE vocabulary


WARMUP_STREAM = 2**31 - 1  # the warm-up's random stream: np.random.default_rng([seed, WARMUP_STREAM])


class BenchError(RuntimeError):
    """The benchmark cannot go on (server unreachable, warm-up failed, nothing to send)."""


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload
    load: LoadConfig  # its request_rate is replaced by each entry of ``rates``
    rates: tuple[float, ...] = (math.inf,)  # one run per rate, in order
    seed: int = 0
    scale: float = 1.0  # synthetic lengths are multiplied by this
    slos: dict[str, float] = field(default_factory=dict)  # goodput SLOs in ms (metrics.SLO_METRICS)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "ignore_eos": True})
    vocab_size: int | None = None  # synthetic prompt ids in [1, vocab_size); None: the server's
    max_model_len: int | None = None  # clip requests to this context; None: the server's
    show_progress: bool = True
    labels: dict[str, Any] = field(default_factory=dict)  # copied into every result (backend, target, ...)

    def __post_init__(self) -> None:
        if not self.rates:
            raise ValueError("rates must not be empty")
        if self.workload.timed and (len(self.rates) > 1 or not math.isinf(self.rates[0])):
            raise ValueError("a trace workload replays its own arrival times; it takes no request rate or sweep")


async def run_bench(client: BenchClient, cfg: BenchConfig, say: Callable[[str], None] = print) -> list[dict]:
    try:
        info = await client.info()
    except Exception as e:
        raise BenchError(f"cannot reach the {client.name} server: {type(e).__name__}: {e}") from e
    vocab = cfg.vocab_size or info.vocab_size or DEFAULT_VOCAB
    rng = np.random.default_rng(cfg.seed)
    requests = cfg.workload.sample(cfg.load.num_requests, rng, scale=cfg.scale, vocab_size=vocab)
    max_len = cfg.max_model_len or info.max_model_len
    if max_len:
        requests, clipped = clip_to_context(requests, max_len)
        if clipped:
            say(f"clipped {clipped} of {len(requests)} requests to the model's context of {max_len} tokens")
    measured = requests
    warmup = warmup_requests(measured, cfg.load.warmup, np.random.default_rng([cfg.seed, WARMUP_STREAM]), vocab)
    warmup_summary = None
    if warmup:
        warmup_summary = await run_warmup(client, warmup, cfg.sampling, cfg.load.max_concurrency)
        say(
            f"warm-up: {warmup_summary['completed']} requests in {warmup_summary['duration']:.2f} s "
            f"(TTFT median {warmup_summary['median_ttft_ms']:.0f} ms), not measured"
        )
    # a file's prompts are the user's: only synthetic (drawn) token-id prompts are redrawn
    fresh = cfg.workload.kind != "jsonl" and all(isinstance(r.prompt, list) for r in measured)
    if len(cfg.rates) > 1 and not fresh:
        say(
            "the file's prompts repeat at every rate: the server's prefix cache may answer them (see cached_input_tokens)"
        )
    results = []
    for i, rate in enumerate(cfg.rates):
        load = replace(cfg.load, request_rate=rate)
        desc = "trace replay" if cfg.workload.timed else f"rate {rate:g} req/s"
        run_rng = np.random.default_rng([cfg.seed, i])
        reqs = (
            measured
            if i == 0 or not fresh
            else redraw_prompts(measured, np.random.default_rng([cfg.seed, i, 1]), vocab)
        )
        records, duration = await run_once(client, reqs, load, cfg.sampling, run_rng, cfg.show_progress, desc)
        result = summarize(records, duration, cfg.slos, cfg.percentiles)
        result.update(_header(cfg, load, info, len(records)))
        result["fresh_prompts"] = fresh or i == 0
        result["warmup_run"] = warmup_summary
        results.append(result)
    return results


def warmup_requests(
    measured: list[BenchRequest], n: int, rng: np.random.Generator, vocab_size: int
) -> list[BenchRequest]:
    """``n`` warm-up requests shaped like the first measured ones (their prompt and output
    lengths, cycled), with prompts of fresh random token ids: they warm the server (first
    steps, batch shapes) but leave nothing in its prefix cache that a measured prompt would
    find, and they take no request out of a trace or a file."""
    return [
        BenchRequest(rng.integers(1, vocab_size, max(r.prompt_len, 1)).tolist(), max(r.prompt_len, 1), r.output_len)
        for r in itertools.islice(itertools.cycle(measured), n)
    ]


def redraw_prompts(reqs: list[BenchRequest], rng: np.random.Generator, vocab_size: int) -> list[BenchRequest]:
    """The same requests with new token ids (same lengths): a sweep's next rate must not find
    its prompts in the server's prefix cache."""
    return [replace(r, prompt=rng.integers(1, vocab_size, len(r.prompt)).tolist()) for r in reqs]


def _header(cfg: BenchConfig, load: LoadConfig, info: Any, sent: int) -> dict:
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        **cfg.labels,
        "model_id": info.model,
        "workload": cfg.labels.get("workload", cfg.workload.kind),
        "scale": cfg.scale,
        "num_prompts": sent,
        "request_rate": "inf" if cfg.workload.timed or math.isinf(load.request_rate) else load.request_rate,
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "warmup": load.warmup,
        "duration_limit": load.duration_s,
        "trace_speedup": load.trace_speedup if cfg.workload.timed else None,
        "seed": cfg.seed,
        "goodput_slos_ms": dict(cfg.slos),
        "sampling": dict(cfg.sampling),
    }


async def run_warmup(
    client: BenchClient, reqs: list[BenchRequest], sampling: dict[str, Any], max_concurrency: int | None
) -> dict:
    """Send the warm-up requests; their summary (completed, duration, latencies)."""
    sem = asyncio.Semaphore(max_concurrency or len(reqs))

    async def one(req: BenchRequest) -> RequestRecord:
        async with sem:
            return await client.send(req, sampling)

    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(r) for r in reqs))
    duration = max(time.perf_counter() - t0, 1e-9)
    failed = [r for r in records if not r.success]
    if failed:
        raise BenchError(f"{len(failed)} of {len(records)} warm-up requests failed; first: {failed[0].error}")
    full = summarize(list(records), duration, percentiles=(50.0,))
    keep = ("completed", "duration", "total_input_tokens", "total_output_tokens", "median_ttft_ms", "median_e2el_ms")
    return {k: full[k] for k in keep}


async def run_once(
    client: BenchClient,
    requests: list[BenchRequest],
    load: LoadConfig,
    sampling: dict[str, Any],
    rng: np.random.Generator,
    show_progress: bool = False,
    desc: str = "",
) -> tuple[list[RequestRecord], float]:
    """Send ``requests`` on ``load``'s schedule; (records of the requests sent, run seconds).

    The run lasts from the first send to the end of the last stream. A request still waiting
    for a concurrency slot when ``duration_s`` passes is not sent.
    """
    trace = [r.arrival_s for r in requests] if requests and requests[0].arrival_s is not None else None
    offsets = schedule(len(requests), load, rng, trace)
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = tqdm(total=len(offsets), desc=desc, unit="req", disable=not show_progress, leave=True)
    t0 = loop.time()
    deadline = None if load.duration_s is None else t0 + load.duration_s

    async def one(req: BenchRequest) -> RequestRecord | None:
        try:
            async with sem if sem is not None else contextlib.nullcontext():
                if deadline is not None and loop.time() >= deadline:
                    return None  # its slot came after the end of the run
                return await client.send(req, sampling)
        finally:
            bar.update(1)

    start = time.perf_counter()
    tasks: list[asyncio.Task] = []
    try:
        for req, offset in zip(requests, offsets):
            delay = t0 + float(offset) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule itself, not synchronisation
            tasks.append(asyncio.create_task(one(req)))
        done = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    duration = time.perf_counter() - start
    records = [r for r in done if r is not None]
    if not records:
        raise BenchError("no request was sent (duration too short for the schedule?)")
    return records, max(duration, 1e-9)
