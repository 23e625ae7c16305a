"""A tensor-parallel mixed pool served by Ray actors: worker ``mixed-0`` is 2 actors, rank 0
the routed DecodeActor (a TPLeaderEngine) and rank 1 a TPFollowerActor, joined by the
controller in the gloo group ``tp/mixed-0``, on a tiny Llama whose 16 query / 8 KV heads TP=2
divides (odd vocab: an uneven vocab split). Concurrent greedy requests give engine.LLM's
tokens, one of them cut by a stop string (rank 1 rebuilds the stop checker from the state
rank 0 sends, so both ranks end it at the same token); GetServerInfo shows the pool's degree
and both ranks. Rank 1 killed mid-request
fails rank 0's next step within seconds with an error naming the dead rank (the health
watcher's period is long here, so the failure is rank 0's own, not the controller's; failover
is off, so the client sees it: never a hang); the next health round (driven by the test)
replaces the whole worker (both ranks, a new group) and it serves LLM's tokens again.

KV between pools of different TP degrees on Ray (prefill TP 1 -> decode TP 2, 2 -> 1, 2 -> 2):
every prompt's KV goes over shm, layer by layer, as whole-head pages: a TP prefill worker
all-gathers them over its group, a TP decode worker's rank 0 cuts each rank's heads (rank 1's
as WriteKV calls over Ray); the tokens are LLM's and every rank's pool is full afterwards."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import ray

from cluster.config import FailoverConfig, PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.controller import Controller, ControllerOptions
from cluster.frontends.grpc_server import server_info_message
from cluster.frontends.service import ServerInfo
from engine import LLM, SamplingParams
from engine.types import RequestSpec
from tests.integration.fast_options import FAST_GROUPS
from tests.router_streams import collect

pytestmark = pytest.mark.integration

WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
ENGINE = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa"}  # with the checkpoint's tokenizer
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 59)), [5, 9, 2, 7], list(range(60, 90))]
GROUP_TIMEOUT_S = 5.0  # every collective of tp/mixed-0: a dead rank fails rank 0's step within it
OPTIONS = ControllerOptions(
    health_interval_s=600.0,  # one round at start; the test drives the others (check_health)
    ping_timeout_s=10.0,
    restart_backoff_s=0.5,
    read_timeout_s=0.5,
    ep_group_timeout_s=GROUP_TIMEOUT_S,
)


def _stop_request(llm: LLM, prompt: list[int]) -> tuple[SamplingParams, list[int]]:
    """Greedy params with a stop string that LLM hits mid-output -> (params, LLM's tokens)."""
    full = llm.generate([prompt], GREEDY)[0].token_ids
    for start in range(4, len(full) - 2):
        stop = llm.tokenizer.decode(full[start : start + 2]).strip()
        if not stop:
            continue
        params = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True, stop=(stop,))
        (out,) = llm.generate([prompt], params)
        if out.finish_reason == "stop" and len(out.token_ids) < len(full):
            return params, out.token_ids
    raise AssertionError(f"no stop string cuts {full}")


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Fraction of positions where the served token equals LLM's (a missing token disagrees)."""
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=False))
    return same / sum(len(w) for w in want)


async def _wait_serving(c: Controller, wid: str, restarts: int, timeout_s: float) -> None:
    """Poll until ``wid`` is replaced ``restarts`` times and healthy again (a deadline, no sleep as sync)."""
    deadline = time.monotonic() + timeout_s
    while True:
        await c.wait_replaced(wid, timeout=max(0.0, deadline - time.monotonic()))
        (w,) = (w for w in c.info().workers if w.worker_id == wid)
        if w.restarts >= restarts and w.healthy:
            return
        assert time.monotonic() < deadline, f"{wid} not replaced within {timeout_s}s: {w}"
        await asyncio.sleep(0.1)  # poll interval


def test_a_tp_pool_on_ray_serves_as_llm_and_a_dead_rank_fails_and_replaces_the_whole_worker(
    ray_local, tiny_checkpoint
) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    llm = LLM(ckpt, **ENGINE)
    want = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    stop_params, stop_want = _stop_request(llm, PROMPTS[2])
    long_prompt = list(range(100, 110))
    long_params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    cfg = ServeConfig(
        model=ckpt,
        pools=(PoolConfig("mixed", "mixed", 1, num_cpus=0.5, engine=ENGINE, tensor_parallel=2),),
        transfer=TransferConfig(kind="shm"),
        failover=FailoverConfig(max_retries=0),  # the client sees the worker's failure
    )

    async def run():
        c = await Controller(cfg, OPTIONS).start()
        try:
            rec = c.workers["mixed-0"]
            assert [f.worker_id for f in rec.followers] == ["mixed-0/tp1"]
            got = await asyncio.gather(
                *(collect(c.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)),
                collect(c.router, "stop", PROMPTS[2], stop_params),
            )
            stopped = got.pop()
            await c.check_health()  # a health round: the follower's stats are polled
            info = c.info()

            # rank 1 dies mid-request: the worker fails within seconds, the client gets the error
            stream = c.router.generate(RequestSpec("long", long_prompt, long_params))
            first = await anext(stream)
            assert first.token_ids and not first.finished and first.error is None
            (follower,) = rec.followers
            t_kill = time.monotonic()
            ray.kill(follower.actor, no_restart=True)
            rest = [chunk async for chunk in stream]
            failed_after = time.monotonic() - t_kill
            await c.check_health()  # a health round: pings both ranks, replaces the worker
            await _wait_serving(c, "mixed-0", restarts=1, timeout_s=180.0)
            assert rec.followers and rec.followers[0].actor is not follower.actor  # rank 1 is a new actor
            after = await asyncio.gather(*(collect(c.router, f"a{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            return got, stopped, info, first, rest, failed_after, after, c.info()
        finally:
            await c.shutdown()

    got, stopped, info, first, rest, failed_after, after, info_after = asyncio.run(run())
    assert [last.finish_reason for _, last in got] == ["length"] * len(PROMPTS)  # type: ignore[union-attr]
    served = [tokens for tokens, _ in got]
    agreement = _agreement(served, want)
    print(f"TP=2 on Ray: {agreement:.4f} of {sum(map(len, want))} greedy tokens equal engine.LLM's")
    assert agreement >= 0.99, (served, want)
    assert stopped[1] is not None and stopped[1].finish_reason == "stop", stopped[1]
    assert stopped[0] == stop_want  # rank 1 stopped it at the same token (else its batches would differ)

    # GetServerInfo: the pool's degree, rank 0 routed, rank 1 connected with the same (SPMD) pool
    (pool,) = info.pools
    assert (pool.name, pool.tensor_parallel, pool.workers) == ("mixed", 2, ("mixed-0",))
    (rank1,) = info.tp_ranks
    assert (rank1.worker_id, rank1.rank, rank1.world_size, rank1.connected, rank1.error) == (
        "mixed-0/tp1",
        1,
        2,
        True,
        None,
    )
    assert rank1.total_blocks == ENGINE["num_blocks"] and rank1.applied > 0
    msg = server_info_message(ServerInfo(cluster=info, inflight=0, max_queue=8))
    assert [(w.worker_id, w.healthy) for w in msg.workers] == [("mixed-0", True)]
    details = json.loads(msg.details_json)
    assert details["pools"][0]["tensor_parallel"] == 2 and details["tp_ranks"][0]["worker_id"] == "mixed-0/tp1"

    # the dead rank: an error that names it, within seconds (the group timeout bounds it), never a hang
    last = rest[-1] if rest else first
    print(f"rank 1 killed: the client's error came {failed_after:.2f}s later: {last.error}")
    assert last.finished and last.error is not None, last
    # rank 0's own step failed (its collective broke) and named the dead rank
    # (named as gone, or as not answering when Ray had not yet noticed the death within the wait)
    assert "engine failed: TPFollowerFailed" in last.error and "mixed-0/tp1: " in last.error, last.error
    assert "actor gone" in last.error or "did not answer" in last.error, last.error
    assert failed_after < 3 * GROUP_TIMEOUT_S, failed_after
    emitted = first.token_ids + [t for ch in rest for t in ch.token_ids]
    assert len(emitted) < long_params.max_tokens  # it really was cut mid-request

    # replaced whole (both ranks, a new group), serving LLM's tokens again
    (w,) = info_after.workers
    print(f"replaced for: {w.last_failure}")
    assert (w.worker_id, w.healthy, w.restarts) == ("mixed-0", True, 1)
    assert "mixed-0/tp1" in (w.last_failure or ""), w.last_failure
    assert _agreement([tokens for tokens, _ in after], want) >= 0.99


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1), (2, 2)], ids=["1to2", "2to1", "2to2"])
def test_kv_moves_between_pools_of_different_tp_degrees_on_ray(
    ray_local, tiny_checkpoint, prefill_tp: int, decode_tp: int
) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    want = [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, GREEDY)]
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 1, num_cpus=0.4, engine=ENGINE, tensor_parallel=prefill_tp),
            PoolConfig("decode", "decode", 1, num_cpus=0.4, engine=ENGINE, tensor_parallel=decode_tp),
        ),
        router=RouterConfig(short_prompt_threshold=0),  # every prompt is prefilled by the prefill worker
        transfer=TransferConfig(kind="shm", layerwise=True),
    )

    async def run():
        c = await Controller(cfg, FAST_GROUPS).start()
        try:
            got = await asyncio.gather(*(collect(c.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            # blocks go back once the streams end and the transfers settle: poll every rank's pool
            deadline = time.monotonic() + 30.0
            while True:
                await c.check_health()  # polls the workers' and the followers' stats
                info = c.info()
                pools = [(w.stats.engine.free_kv_blocks, w.stats.engine.total_kv_blocks) for w in info.workers]
                pools += [(r.free_blocks, r.total_blocks) for r in info.tp_ranks]
                full = all(0 < total == free for free, total in pools)
                if full or time.monotonic() > deadline:
                    return got, info, full, pools
                await asyncio.sleep(0.1)  # poll interval
        finally:
            await c.shutdown()

    got, info, full, pools = asyncio.run(run())
    served = [tokens for tokens, _ in got]
    agreement = _agreement(served, want)
    print(f"prefill TP={prefill_tp} -> decode TP={decode_tp} on Ray: {agreement:.4f} of {sum(map(len, want))} equal")
    assert agreement >= 0.99, (served, want)
    assert [last.error for _, last in got] == [None] * len(PROMPTS)  # type: ignore[union-attr]
    # every rank of both workers is up: the followers are the TP ranks beyond rank 0
    assert len(info.tp_ranks) == (prefill_tp - 1) + (decode_tp - 1)
    (pre,) = (w.stats for w in info.workers if w.pool == "prefill")
    (dec,) = (w.stats for w in info.workers if w.pool == "decode")
    assert pre.transfer_bytes and dec.transfer_failures == 0  # the KV really crossed, none failed
    assert full, pools


def test_rank_0s_channel_reports_a_failed_follower_call_and_a_dead_follower(ray_local, tiny_checkpoint) -> None:
    """ray_follower_channel against a real TPFollowerActor: a call that raised on the follower
    comes back (without blocking rank 0) as the follower's TPFollowerFailed; a dead actor as
    "actor gone", from both ``failures`` and ``ask``."""
    from decode_worker.actor import TPFollowerActor, ray_follower_channel
    from engine.runtime.tensor_parallel import Admit, Step

    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    actor = TPFollowerActor.options(num_cpus=0.5).remote(ckpt, {**ENGINE, "skip_tokenizer_init": True}, 1, 2, "m-0")
    assert ray.get(actor.ping.remote(), timeout=120) == "m-0/tp1"
    channel = ray_follower_channel(actor)

    def poll(what):
        deadline = time.monotonic() + 30.0
        while not (got := what()) and time.monotonic() < deadline:
            time.sleep(0.02)  # poll interval
        return got

    channel.send(1, Admit("never-reserved", 3))  # raises in the follower's apply thread
    assert poll(lambda: ray.get(actor.check.remote())) == "KeyError: 'never-reserved'"
    assert channel.failures() == []  # call 1 itself was accepted
    channel.send(2, Step())  # refused: the follower failed
    assert poll(channel.failures) == ["TPFollowerFailed: m-0/tp1: KeyError: 'never-reserved'"]
    assert channel.ask(5.0) == "KeyError: 'never-reserved'"
    ray.kill(actor, no_restart=True)  # asynchronous: wait until Ray reports the actor dead
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        try:
            ray.get(actor.check.remote(), timeout=5.0)  # answers (the failure) until the actor is dead
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.02)  # poll interval
    with pytest.raises(RuntimeError, match="actor gone"):
        channel.ask(5.0)
    channel.send(3, Step())
    (gone,) = poll(channel.failures)
    assert gone.startswith("actor gone: ") and "Actor" in gone, gone  # RayActorError or a subclass
