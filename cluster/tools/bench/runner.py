"""Drives a benchmark: workload -> warm-up -> one timed run per request rate -> result dicts.

Lifecycle of ``run_bench``: ask the server for its model info (vocabulary size and context
length, used to draw and clip synthetic prompts), sample the workload once (every rate of a
sweep replays the same requests), run the warm-up requests (any failure aborts the
benchmark: a server that cannot answer them would only produce a table of errors), then for
each rate send the requests on the arrival schedule and summarise them. Each result dict has
``vllm bench serve``'s keys plus the run's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    wanted = cfg.load.num_requests + cfg.load.warmup
    requests = cfg.workload.sample(wanted, rng, scale=cfg.scale, vocab_size=vocab)
    max_len = cfg.max_model_len or info.max_model_len
    if max_len:
        requests, clipped = clip_to_context(requests, max_len)
        if clipped:
            say(f"clipped {clipped} of {len(requests)} requests to the model's context of {max_len} tokens")
    warmup, measured = requests[: cfg.load.warmup], requests[cfg.load.warmup :]
    if not measured:
        raise BenchError(f"the workload has {len(requests)} requests, all used for warm-up")
    if warmup:
        await run_warmup(client, warmup, cfg.sampling, cfg.load.max_concurrency)
    results = []
    for i, rate in enumerate(cfg.rates):
        load = replace(cfg.load, request_rate=rate)
        desc = "trace replay" if cfg.workload.timed else f"rate {rate:g} req/s"
        run_rng = np.random.default_rng([cfg.seed, i])
        records, duration = await run_once(client, measured, load, cfg.sampling, run_rng, cfg.show_progress, desc)
        result = summarize(records, duration, cfg.slos, cfg.percentiles)
        result.update(_header(cfg, load, info, len(records)))
        results.append(result)
    return results


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
) -> None:
    sem = asyncio.Semaphore(max_concurrency or len(reqs))

    async def one(req: BenchRequest) -> RequestRecord:
        async with sem:
            return await client.send(req, sampling)

    records = await asyncio.gather(*(one(r) for r in reqs))
    failed = [r for r in records if not r.success]
    if failed:
        raise BenchError(f"{len(failed)} of {len(records)} warm-up requests failed; first: {failed[0].error}")


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
