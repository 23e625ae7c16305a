"""Several model workers over one attention pool, in process: LocalCluster with a prefill
worker, a decode pool of 2 (two model workers) and 4 attention workers, 2 per model worker
(cluster/control/attention_groups.py: decode-0 holds attention-0/1 in attn/decode-0, decode-1
holds attention-2/3 in attn/decode-1). Every prompt is transferred (short_prompt_threshold 0,
loopback): the prefill worker pushes its KV straight to an attention worker of the model
worker the router placed the request on. Concurrent greedy streams equal engine.LLM; both model
workers served; every EXPECT (and so every page the prefill worker sent) reached only the
placed model worker's own attention workers; every pool is full again; ClusterInfo reads each
attention worker's free pages from its own model worker's report. A model worker killed
mid-stream takes down only its own group: the stream fails over to the other model worker,
whose attention workers keep serving, and finishes with LLM's tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from cluster.config import ConfigError, PoolConfig, ServeConfig
from cluster.control.attention_groups import plan_attention_groups
from cluster.control.local import LocalCluster
from cluster.frontends.grpc_server import server_info_message
from cluster.frontends.service import ServerInfo
from cluster.serve import _print_layout
from engine import SamplingParams
from engine.types import RequestSpec
from tests.router_streams import collect_ok
from tests.unit.cluster.attention_cluster import (
    ATTN_BLOCKS,
    ATTN_ENGINE,
    GREEDY,
    MODEL_ENGINE,
    attention_config,
    pools_full,
    reference,
)

PROMPTS = [
    list(range(3, 14)),
    list(range(20, 27)),
    list(range(40, 59)),
    [5, 9, 2, 7],
    list(range(60, 90)),
    list(range(100, 113)),
    [7, 7, 8, 9, 10, 400],
    list(range(200, 222)),
]
GROUPS = {"decode-0": ("attention-0", "attention-1"), "decode-1": ("attention-2", "attention-3")}


def _config(ckpt: str) -> ServeConfig:
    return attention_config(ckpt, 2, 4)


class Placements:
    """Which model worker each request was placed on (start_transfer or generate_local) and which attention
    worker each request's EXPECT reached, recorded by wrapping the workers' methods."""

    def __init__(self, cluster: LocalCluster):
        self.model: dict[str, list[str]] = {}  # request id -> the model workers it was placed on, in order
        self.expected: dict[str, set[str]] = {}  # request id -> attention workers that got its EXPECT
        self._lock = threading.Lock()
        for wid in GROUPS:
            worker = cluster.workers[wid]
            for name in ("start_transfer", "generate_local"):  # a transferred or a local prefill
                real = getattr(worker, name)

                def placed(spec, emitted=(), real=real, wid=wid):
                    rid = spec.request_id.partition("#")[0]  # a failover's attempt: "<request id>#<n>"
                    with self._lock:
                        self.model.setdefault(rid, []).append(wid)
                    return real(spec, emitted)

                setattr(worker, name, placed)  # the local handle calls it by name
        for aid, aw in cluster.attention.items():
            real_expect = aw.kv.expect

            def expect(rid, pages, real_expect=real_expect, aid=aid):
                with self._lock:
                    self.expected.setdefault(rid, set()).add(aid)
                return real_expect(rid, pages)

            aw.kv.expect = expect


async def _pools_full(cluster: LocalCluster) -> None:
    await pools_full(cluster, list(GROUPS), 4)


def test_two_model_workers_each_serve_from_their_own_attention_workers(tiny_checkpoint, capsys) -> None:
    ckpt = tiny_checkpoint("llama")
    cfg = _config(ckpt)
    assert {p.model_worker: p.attention_workers for p in plan_attention_groups(cfg)} == GROUPS

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            placed = Placements(cluster)
            got = await asyncio.gather(*(collect_ok(cluster.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            await _pools_full(cluster)
            return got, placed, cluster.info()
        finally:
            await cluster.stop()

    got, placed, info = asyncio.run(run())
    assert got == reference(ckpt, PROMPTS)
    assert all(len(models) == 1 for models in placed.model.values()), placed.model  # no failover
    assert {models[0] for models in placed.model.values()} == set(GROUPS), placed.model  # both served
    # every request's KV went to exactly one attention worker, one of its model worker's own
    assert set(placed.expected) == set(placed.model) == {f"r{i}" for i in range(len(PROMPTS))}
    for rid, (model,) in placed.model.items():
        assert len(placed.expected[rid]) == 1 and placed.expected[rid] <= set(GROUPS[model]), (rid, model, placed)
    by_id = {w.worker_id: w.stats for w in info.workers}
    for model in GROUPS:
        rep = by_id[model].attention
        assert rep.connected and rep.attention_workers == 2 and rep.tokens > 0  # attention ran on its group
    received = {a.worker_id: a.kv_bytes_received for a in info.attention_workers}
    for model, attention in GROUPS.items():
        assert sum(received[a] for a in attention) > 0, (model, received)
    assert sum(received.values()) == by_id["prefill-0"].transfer_bytes  # every byte sent landed on a shard
    # shard indices are per group (rank - 1): attention-2 is decode-1's shard 0
    assert {a.worker_id: a.shard for a in info.attention_workers} == {
        "attention-0": 0,
        "attention-1": 1,
        "attention-2": 0,
        "attention-3": 1,
    }
    # free pages are read from each attention worker's own model worker's report
    busy = dataclasses.replace(by_id["decode-1"].attention, used_blocks=(3, 5))
    workers = tuple(
        dataclasses.replace(w, stats=dataclasses.replace(w.stats, attention=busy)) if w.worker_id == "decode-1" else w
        for w in info.workers
    )
    skewed = dataclasses.replace(info, workers=workers)
    free = {a.worker_id: skewed.attention_free_blocks(a) for a in info.attention_workers}
    assert free == {
        "attention-0": ATTN_BLOCKS,
        "attention-1": ATTN_BLOCKS,
        "attention-2": ATTN_BLOCKS - 3,
        "attention-3": ATTN_BLOCKS - 5,
    }
    # GetServerInfo: each model worker's pool is its own attention workers' total; theirs as above
    msg = server_info_message(ServerInfo(cluster=skewed, inflight=0, max_queue=8))
    assert {w.worker_id: (w.role, w.free_kv_blocks, w.total_kv_blocks) for w in msg.workers} == {
        "prefill-0": ("prefill", by_id["prefill-0"].engine.total_kv_blocks, by_id["prefill-0"].engine.total_kv_blocks),
        "decode-0": ("decode", 2 * ATTN_BLOCKS, 2 * ATTN_BLOCKS),
        "decode-1": ("decode", 2 * ATTN_BLOCKS, 2 * ATTN_BLOCKS),  # its engine stats were left as reported
        **{a: ("attention", n, ATTN_BLOCKS) for a, n in free.items()},
    }
    # `splitserve serve` lists each attention worker with its blocks and its model worker
    capsys.readouterr()
    _print_layout(skewed)
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("attention-")]
    assert [(w[0], w[-3], w[-1]) for w in lines] == [
        ("attention-0", f"{ATTN_BLOCKS}/{ATTN_BLOCKS}", "decode-0"),
        ("attention-1", f"{ATTN_BLOCKS}/{ATTN_BLOCKS}", "decode-0"),
        ("attention-2", f"{ATTN_BLOCKS - 3}/{ATTN_BLOCKS}", "decode-1"),
        ("attention-3", f"{ATTN_BLOCKS - 5}/{ATTN_BLOCKS}", "decode-1"),
    ]


def test_a_killed_model_worker_takes_down_only_its_own_group(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama")
    long_prompt = list(range(300, 312))
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def run():
        cluster = await LocalCluster(_config(ckpt), ep_group_timeout_s=30.0).start()
        try:
            placed = Placements(cluster)
            stream = cluster.router.generate(RequestSpec("long", long_prompt, long))
            first = await anext(stream)
            assert first.error is None and first.token_ids and not first.finished
            (victim,) = placed.model["long"]
            (survivor,) = set(GROUPS) - {victim}
            await cluster.kill_worker(victim)
            rest = [chunk async for chunk in stream]
            after = await asyncio.gather(
                *(collect_ok(cluster.router, f"a{i}", p, GREEDY) for i, p in enumerate(PROMPTS))
            )
            states = {a.worker_id: a.state for a in cluster.info().attention_workers}
            return victim, survivor, first, rest, after, dict(placed.model), states
        finally:
            await cluster.stop()

    victim, survivor, first, rest, after, placed, states = asyncio.run(run())
    assert all(ch.error is None for ch in rest), rest[-1]
    assert first.token_ids + [t for ch in rest for t in ch.token_ids] == reference(ckpt, [long_prompt], long)[0]
    assert after == reference(ckpt, PROMPTS)
    assert placed.pop("long") == [victim, survivor]  # the stream failed over to the other model worker
    assert set(placed) == {f"a{i}" for i in range(len(PROMPTS))}
    assert all(models == [survivor] for models in placed.values()), placed  # only the survivor serves
    # the killed model worker's CLOSE ended its own attention workers' loops; the others serve on
    assert states == {
        **{a: "closed" for a in GROUPS[victim]},
        **{a: "serving" for a in GROUPS[survivor]},
    }


@pytest.mark.parametrize("attention", [3, 6])
def test_an_attention_pool_not_a_multiple_of_the_model_workers_is_refused(attention: int) -> None:
    pools = (
        PoolConfig("decode", "decode", 4, engine=MODEL_ENGINE),
        PoolConfig("attention", "attention", attention, engine=ATTN_ENGINE),
    )
    with pytest.raises(
        ConfigError,
        match=rf"^pools\[1\]\.num_workers: .*\(pools\[0\]\.num_workers = 4\): {attention} attention workers is not a "
        r"multiple of 4",
    ):
        ServeConfig(model="m", pools=pools)
