"""Chaos: random SIGKILLs of prefill and decode worker processes under steady load with random
cancels and deadlines, through the Ray controller and the ServingBackend (what the frontends
call), on a local Ray instance with the real model (SmolLM2-135M-Instruct, fp32) and the
shm transport.

Invariants checked at the end:
- every request ends complete, or cancelled / timed out by the test, or with an explicit
  error after the retries. A complete output equals the reference, and a partial one is a
  prefix of it, so no token was duplicated or lost across failovers. The reference of each
  prompt is engine.LLM's greedy output, checked argmax-consistent (ties within 1e-3 logits)
  with transformers' full no-cache forward over prompt + output, so every served token is
  argmax-consistent with transformers;
- every worker's KV pool is full again (the replacements' included);
- the metrics agree with what the clients saw: requests by finish reason, tokens streamed,
  requests given up; and failovers happened (the kills hit requests in flight).

Bounded: ``LOAD_S`` of load, a kill every ``KILL_EVERY_S`` (each waits for the previous
replacement), then the drain; about two minutes on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field

import pytest
import ray
import torch

from cluster.config import FailoverConfig, PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.controller import Controller
from cluster.frontends.service import NoWorkerAvailable, Overloaded, RequestTimeout, ServingBackend
from cluster.metrics.registry import Metrics
from engine import LLM, SamplingParams
from tests.correctness.full_forward import check_argmax_consistent
from tests.integration.fast_options import FAST
from tests.real_model import real_model_dir, transformers_module

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENGINE = {"block_size": 4, "num_blocks": 192, "max_num_batched_tokens": 32}
SHORT = 8
LOAD_S = 45.0
KILL_EVERY_S = 6.0
CLIENTS = 6
SEED = 20261216


@dataclass
class Outcome:
    prompt: int  # index into the prompt pool
    tokens: list[int] = field(default_factory=list)
    kind: str = ""  # "length" | "cancelled" | "timeout" | "failed" | "refused"
    error: str | None = None


def _pool(seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    lengths = [3, 6, 10, 14, 20, 27, 33, 41, 50, 12, 24, 5]  # both paths: local and split prefill
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randint(12, 48) for _ in lengths]
    return prompts, max_tokens


async def _client(backend: ServingBackend, rng: random.Random, prompts, max_tokens, until: float, out: list) -> None:
    while time.monotonic() < until:
        i = rng.randrange(len(prompts))
        o = Outcome(i)
        out.append(o)
        params = SamplingParams(max_tokens=max_tokens[i], temperature=0.0, ignore_eos=True)
        roll = rng.random()
        cancel_at = rng.randint(1, max_tokens[i] - 1) if roll < 0.15 else None
        timeout = rng.uniform(0.02, 0.25) if 0.15 <= roll < 0.3 else None
        gen = backend.generate(prompts[i], params, timeout_s=timeout)
        try:
            async for d in gen:
                o.tokens += d.token_ids
                if d.error is not None:
                    o.kind, o.error = "failed", d.error
                elif d.finish_reason is not None:
                    o.kind = d.finish_reason
                if cancel_at is not None and len(o.tokens) >= cancel_at and not o.kind:
                    o.kind = "cancelled"
                    break
        except RequestTimeout:
            o.kind = "timeout"
        except (NoWorkerAvailable, Overloaded) as e:
            o.kind, o.error = "refused", str(e)
        finally:
            await gen.aclose()


async def _pid(controller: Controller, wid: str) -> int:
    return await controller.workers[wid].actor.__ray_call__.remote(lambda self: os.getpid())


def test_chaos_kills_under_load_lose_nothing():
    model = real_model_dir()
    prompts, max_tokens = _pool(SEED)
    llm = LLM(model, **ENGINE)
    reference = [
        llm.generate([p], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids
        for p, n in zip(prompts, max_tokens)
    ]
    del llm
    hf = transformers_module().AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    check_argmax_consistent(hf, prompts, reference, [f"prompt {i}" for i in range(len(prompts))])
    del hf
    cfg = ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", 2, num_cpus=0.5, engine=ENGINE),
            PoolConfig("decode", "decode", 2, num_cpus=0.5, engine=ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=SHORT),
        transfer=TransferConfig(kind="shm", timeout_s=5.0),
        failover=FailoverConfig(max_retries=4, wait_for_worker_s=60.0),
    )
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)

    async def run():
        c = await Controller(cfg, FAST).start()
        try:
            backend = ServingBackend.from_model_dir(c.router, model, max_queue=64, info=c.info)
            metrics = backend.metrics = Metrics("chaos")
            metrics.attach(c.router, transport="shm")
            rng = random.Random(SEED)
            outcomes: list[Outcome] = []
            until = time.monotonic() + LOAD_S
            clients = [
                asyncio.create_task(_client(backend, random.Random(SEED + k), prompts, max_tokens, until, outcomes))
                for k in range(CLIENTS)
            ]
            kills: list[str] = []
            while time.monotonic() < until - KILL_EVERY_S / 2:
                await asyncio.sleep(rng.uniform(0.5, 1.5) * KILL_EVERY_S)
                # one fault at a time: the previous one was noticed and recovered
                while sum(rec.restarts for rec in c.workers.values()) < len(kills) or c._replacing:
                    await asyncio.sleep(0.1)  # poll interval
                victim = rng.choice(sorted(c.workers))
                os.kill(await _pid(c, victim), signal.SIGKILL)
                kills.append(victim)
            await asyncio.wait_for(asyncio.gather(*clients), 300)
            deadline = time.monotonic() + 180
            while sum(rec.restarts for rec in c.workers.values()) < len(kills) or c._replacing:
                assert time.monotonic() < deadline, "a killed worker was never replaced"
                await asyncio.sleep(0.1)  # poll interval: the watcher notices and replaces
            pools = {}
            for wid, rec in c.workers.items():
                deadline = time.monotonic() + 30
                while True:  # a prefill worker frees blocks once its transfers settle
                    st = (await rec.handle.stats()).engine
                    if st.free_kv_blocks == st.total_kv_blocks or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)  # poll interval
                pools[wid] = (st.free_kv_blocks, st.total_kv_blocks)
            restarts = {wid: rec.restarts for wid, rec in c.workers.items()}
            # the worker registry (heartbeats of the health check) lists each current incarnation
            await c.check_health()
            registry = {w.worker_id: w.incarnation for w in await c.store.live_workers()}
            assert registry == {wid: rec.started_at for wid, rec in c.workers.items()}, registry
            return outcomes, kills, pools, restarts, metrics, c.router.stats
        finally:
            await c.shutdown()

    try:
        outcomes, kills, pools, restarts, metrics, stats = asyncio.run(run())
    finally:
        ray.shutdown()

    by_kind: dict[str, int] = {}
    for o in outcomes:
        assert o.kind, f"request on prompt {o.prompt} ended without an outcome: {o}"
        by_kind[o.kind] = by_kind.get(o.kind, 0) + 1
        ref = reference[o.prompt]
        if o.kind == "length":
            assert o.tokens == ref, f"prompt {o.prompt}: completed output differs from the reference"
        else:  # cancelled, timed out, failed or refused: what arrived is still right
            assert o.tokens == ref[: len(o.tokens)], f"prompt {o.prompt} ({o.kind}): wrong tokens {o}"
        if o.kind == "failed":
            assert "failed on" in (o.error or "") and "placements" in o.error, o.error
    print(f"chaos: {len(outcomes)} requests {by_kind}, kills {kills}, failovers {dict(stats.failovers)}")
    # every kill was recovered and every pool is full again
    assert len(kills) >= 4, kills
    assert sum(restarts.values()) == len(kills), (restarts, kills)
    assert all(free == total == ENGINE["num_blocks"] for free, total in pools.values()), pools
    # the kills hit requests in flight, and those went on elsewhere
    assert sum(stats.failovers.values()) >= 1, stats.failovers
    assert by_kind.get("length", 0) >= len(outcomes) // 2, by_kind
    assert by_kind.get("cancelled", 0) >= 1 and by_kind.get("timeout", 0) >= 1, by_kind  # both were exercised
    # the metrics say what the clients saw
    fin = {r: metrics.sample_value("splitserve_requests_total", {"model": "chaos", "finish_reason": r}) for r in
           ("length", "cancelled", "timeout", "abort", "error")}  # fmt: skip
    assert fin["length"] == by_kind.get("length", 0)
    assert fin["cancelled"] == by_kind.get("cancelled", 0)
    assert fin["timeout"] == by_kind.get("timeout", 0)
    assert fin["abort"] == by_kind.get("failed", 0)  # failed after the retries: finish_reason abort
    streamed = metrics.sample_value("splitserve_generation_tokens_total", {"model": "chaos"})
    assert streamed == sum(len(o.tokens) for o in outcomes if o.kind != "refused")
    gave_up = sum(
        metrics.sample_value("splitserve_request_failover_exhausted_total", {"model": "chaos", "cause": c})
        for c in stats.exhausted
    )
    assert gave_up == by_kind.get("failed", 0) + by_kind.get("refused", 0) - _refused_without_retries(outcomes)
    failovers = sum(
        metrics.sample_value("splitserve_request_failovers_total", {"model": "chaos", "cause": c})
        for c in stats.failovers
    )
    assert failovers == sum(stats.failovers.values()) >= 1


def _refused_without_retries(outcomes: list[Outcome]) -> int:
    """Refusals at admission (no placement was tried: nothing to give up on)."""
    return sum(1 for o in outcomes if o.kind == "refused" and "placements" not in (o.error or ""))
