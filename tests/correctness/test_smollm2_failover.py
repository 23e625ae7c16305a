"""The issue's decode-kill scenario on the real model, through the Ray controller: SmolLM2
served by 1 prefill + 1 decode worker (shm), 4 streaming requests of 150 tokens, the decode
worker's process SIGKILLed after about 10 tokens of each. All 4 streams complete (they wait
for the replacement and continue there, their tokens so far re-prefilled), every token
argmax-consistent with transformers' full forward, none repeated or missing."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from cluster.config import FailoverConfig, PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.controller import Controller, ControllerOptions
from engine import SamplingParams
from engine.types import RequestSpec
from tests.correctness.full_forward import check_argmax_consistent

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ENGINE = {"num_blocks": 128, "max_num_batched_tokens": 256}
MAX_TOKENS = 150
KILL_AFTER = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
OPTIONS = ControllerOptions(health_interval_s=0.5, ping_timeout_s=10.0, restart_backoff_s=1.0, read_timeout_s=0.5)


def test_decode_kill_with_one_decode_worker_loses_no_stream(smollm2_dir, chat_prompts, hf_model, record_property):
    prompts = chat_prompts[:4]
    cfg = ServeConfig(
        model=smollm2_dir,
        pools=(
            PoolConfig("prefill", "prefill", 1, num_cpus=0.5, engine=ENGINE),
            PoolConfig("decode", "decode", 1, num_cpus=0.5, engine=ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=1),
        transfer=TransferConfig(kind="shm"),
        failover=FailoverConfig(wait_for_worker_s=300.0),
    )
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    async def run():
        c = await Controller(cfg, OPTIONS).start()
        try:
            outs: list[list[int]] = [[] for _ in prompts]
            arrivals: list[list[float]] = [[] for _ in prompts]
            held = asyncio.Event()

            async def one(i: int):
                last = None
                async for chunk in c.router.generate(RequestSpec(f"s{i}", prompts[i], GREEDY)):
                    outs[i] += chunk.token_ids
                    arrivals[i].append(time.monotonic())
                    last = chunk
                    if len(outs[i]) >= KILL_AFTER and not held.is_set():
                        await held.wait()  # stop reading: the kill lands mid-stream
                return last

            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            deadline = time.monotonic() + 300
            while not all(len(o) >= KILL_AFTER for o in outs):
                assert time.monotonic() < deadline, "the streams never reached the kill point"
                await asyncio.sleep(0.02)  # poll interval
            pid = await c.workers["decode-0"].actor.__ray_call__.remote(lambda self: os.getpid())
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            held.set()
            lasts = await asyncio.wait_for(asyncio.gather(*tasks), 600)
            recovery = max(next(t for t in ts if t > killed_at) - killed_at for ts in arrivals)
            return outs, lasts, recovery, c.router.stats, c.workers["decode-0"].restarts
        finally:
            await c.shutdown()

    try:
        outs, lasts, recovery, stats, restarts = asyncio.run(run())
    finally:
        ray.shutdown()
    record_property("recovery_s", round(recovery, 2))
    assert restarts == 1
    assert all(last.finish_reason == "length" and last.error is None for last in lasts), lasts
    assert [len(o) for o in outs] == [MAX_TOKENS] * 4  # 4 of 4 complete, none repeated or missing
    assert stats.failovers["worker_lost"] == 4 and stats.waits == 4
    agreement = check_argmax_consistent(hf_model, prompts, outs, [f"stream {i}" for i in range(4)])
    record_property("argmax_exact", agreement.exact)
    record_property("argmax_ties", agreement.ties)
