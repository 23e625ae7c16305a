"""The Ray controller on a local two-node Ray cluster (CPU): pools as actors, KV moved
between actor processes, custom-resource placement, and replacement of killed actors.

One emulated cluster for the whole module (``ray.cluster_utils.Cluster``)::

    head node   CPU 4, {"prefill_node": 1}     every unpinned actor lands here (only CPUs)
    2nd node    CPU 0, {"decode_node": 1}      only actors asking for "decode_node" (0 CPUs)

Greedy output through the cluster is compared token for token with the colocated
``engine.LLM``. Tests share one event loop, so a controller's watcher task keeps its loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.controller import Controller
from cluster.control.routing import RouteReason
from cluster.frontends.grpc_server import server_info_message
from cluster.frontends.service import ServerInfo
from engine import LLM, SamplingParams
from engine.types import RequestSpec, WorkerStats
from tests.integration.fast_options import FAST
from tests.router_streams import collect

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 4, "num_blocks": 128, "max_num_batched_tokens": 16}
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SHORT = 8  # prompts shorter than this are prefilled on the decode worker (no transfer)
LENGTHS = (3, 5, 9, 17, 33, 47, 60, 12)  # mixed: short path and chunked split prefill


def _prompts(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def _config(model: str, kind: str, prefill: dict | None = None, decode: dict | None = None) -> ServeConfig:
    return ServeConfig(
        model=model,
        pools=(
            PoolConfig("prefill", "prefill", 1, **{"num_cpus": 0.5, "engine": ENGINE, **(prefill or {})}),
            PoolConfig("decode", "decode", 1, **{"num_cpus": 0.5, "engine": ENGINE, **(decode or {})}),
        ),
        router=RouterConfig(short_prompt_threshold=SHORT),
        transfer=TransferConfig(kind=kind, timeout_s=5.0),
    )


def _live_groups() -> list[tuple[str, list[dict], float]]:
    """(strategy, bundles, CPUs of the group still free) of every placement group not removed."""
    free = ray.available_resources()
    return [
        (g["strategy"], list(g["bundles"].values()), free.get(f"CPU_group_{pid}", 0.0))
        for pid, g in ray.util.placement_group_table().items()
        if g["state"] != "REMOVED"
    ]


def _record_routes(c: Controller) -> list[RouteReason]:
    """Wrap the routing policy so the test sees which path every placement took."""
    reasons: list[RouteReason] = []
    route = c.router.policy.route

    def recording(*args, **kwargs):
        decision = route(*args, **kwargs)
        reasons.append(decision.reason)
        return decision

    c.router.policy.route = recording
    return reasons


async def _collect(c: Controller, rid: str, prompt: list[int], params: SamplingParams = GREEDY):
    return await collect(c.router, rid, prompt, params)


async def _generate_all(c: Controller, prompts: list[list[int]], tag: str) -> list[list[int]]:
    results = await asyncio.gather(*(_collect(c, f"{tag}{i}", p) for i, p in enumerate(prompts)))
    for _, last in results:
        assert last is not None and last.finish_reason == "length", last
    return [tokens for tokens, _ in results]


async def _poll(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


async def _assert_pools_full(
    c: Controller, num_blocks: int = ENGINE["num_blocks"], timeout: float = 15.0
) -> dict[str, WorkerStats]:
    """Every worker's KV pool is full again: all ``num_blocks`` free (a pool reporting 0 of 0
    is not full). Prefill workers free blocks once their sender reports the transfer done
    (asynchronously), so poll each stats() until a deadline. Returns the last reports."""
    deadline = time.monotonic() + timeout
    loads = {}
    for wid, rec in c.workers.items():
        while True:
            load = await rec.handle.stats()
            if load.engine.free_kv_blocks == load.engine.total_kv_blocks or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # poll interval
        assert load.engine.total_kv_blocks == num_blocks, (
            f"{wid} reports a pool of {load.engine.total_kv_blocks} blocks"
        )
        assert load.engine.free_kv_blocks == load.engine.total_kv_blocks, f"{wid} leaked KV blocks: {load}"
        loads[wid] = load
    return loads


def _assert_no_transfer_failed(loads: dict[str, WorkerStats]) -> None:
    """No worker saw a KV transfer fail (in a test that kills nothing)."""
    failures = {wid: load.transfer_failures for wid, load in loads.items()}
    assert set(failures.values()) == {0}, failures


@pytest.fixture(scope="module")
def ray_nodes():
    if ray.is_initialized():  # a connection another module left behind would block ray.init
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "resources": {"prefill_node": 1}, "include_dashboard": False},
    )
    decode_node = cluster.add_node(num_cpus=0, resources={"decode_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield SimpleNamespace(head=cluster.head_node.node_id, decode=decode_node.node_id)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    cache: dict = {}

    def get(family: str, prompts: list[list[int]]) -> list[list[int]]:
        key = (family, tuple(map(tuple, prompts)))
        if key not in cache:
            llm = LLM(tiny_checkpoint(family), **ENGINE)
            cache[key] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        return cache[key]

    return get


def test_loopback_transport_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="loopback.*one process"):
        Controller(_config(tiny_checkpoint("llama"), "loopback"))


@pytest.mark.parametrize(
    "kind,family",
    [
        ("shm", "llama"),
        pytest.param("grpc", "llama", marks=pytest.mark.slow),
        pytest.param("torch", "llama", marks=pytest.mark.slow),
        pytest.param("shm", "qwen2_moe", marks=pytest.mark.slow),
    ],
)
def test_greedy_through_ray_equals_llm(ray_nodes, loop, tiny_checkpoint, reference, kind, family):
    prompts = _prompts(seed=1)
    expected = reference(family, prompts)

    async def run():
        c = await Controller(_config(tiny_checkpoint(family), kind), FAST).start()
        try:
            reasons = _record_routes(c)
            got = await _generate_all(c, prompts, "r")
            loads = await _assert_pools_full(c)
            await c.router.refresh_loads()  # info() shows the last stats poll
            groups = {"during": _live_groups()}
            return got, reasons, c.info(), groups, loads
        finally:
            await c.shutdown()
            if "groups" in locals():
                groups["after"] = _live_groups()

    got, reasons, info, groups, loads = loop.run_until_complete(run())
    assert got == expected
    # one placement group held both workers' bundles while serving, removed at shutdown
    strategy = "STRICT_PACK" if kind == "shm" else "PACK"
    assert info.placement == strategy
    assert groups["during"] == [(strategy, [{"CPU": 0.5}, {"CPU": 0.5}], 0.0)], groups
    assert groups["after"] == [], groups
    # every long prompt crossed actors through the transport; short ones stayed local
    assert sorted(reasons) == sorted(
        RouteReason.SPLIT if len(p) >= SHORT else RouteReason.SHORT_PROMPT for p in prompts
    )
    assert {w.worker_id: (w.role, w.healthy, w.restarts) for w in info.workers} == {
        "prefill-0": ("prefill", True, 0),
        "decode-0": ("decode", True, 0),
    }
    # GetServerInfo of this controller's cluster shows each worker's real KV pool (all free again)
    msg = server_info_message(ServerInfo(cluster=info, inflight=0, max_queue=8))
    kv = {w.worker_id: (w.free_kv_blocks, w.total_kv_blocks) for w in msg.workers}
    assert kv == {w: (ENGINE["num_blocks"], ENGINE["num_blocks"]) for w in ("prefill-0", "decode-0")}, kv
    # none failed, one completed transfer per long prompt
    _assert_no_transfer_failed(loads)
    assert loads["prefill-0"].transfer_seconds.count == sum(len(p) >= SHORT for p in prompts)


def test_pools_land_on_nodes_carrying_their_resources(ray_nodes, loop, tiny_checkpoint, reference):
    # decode asks for no CPU: the only CPUs are on the head node, the only decode_node on the 2nd
    cfg = _config(
        tiny_checkpoint("llama"),
        "grpc",  # across nodes: shm would be refused
        prefill={"resources": {"prefill_node": 1}},
        decode={"num_cpus": 0, "resources": {"decode_node": 1}},
    )
    prompts = _prompts((20, 4), seed=2)

    async def run():
        c = await Controller(cfg, FAST).start()
        try:
            actual = {wid: await rec.handle.node_id() for wid, rec in c.workers.items()}
            return actual, await _generate_all(c, prompts, "p"), c.info()
        finally:
            await c.shutdown()

    actual, got, info = loop.run_until_complete(run())
    assert actual == {"prefill-0": ray_nodes.head, "decode-0": ray_nodes.decode}
    assert {w.worker_id: w.node_id for w in info.workers} == actual
    assert got == reference("llama", prompts)


def test_saturated_prefill_promotes_a_decode_worker_to_mixed_and_back(ray_nodes, loop, tiny_checkpoint, reference):
    # 1 prefill + 2 decode workers; more than 100 pending prompt tokens on the prefill pool
    # saturate it, fewer than 10 relieve it (hysteresis), any idle decode worker may switch
    router = RouterConfig(
        short_prompt_threshold=SHORT,
        prefill_saturation_tokens=100,
        prefill_release_tokens=10,
        mixed_max_running=64,
        mixed_min_free_kv_fraction=0.0,
        max_mixed_workers=1,
    )
    base = _config(tiny_checkpoint("llama"), "shm")
    cfg = ServeConfig(
        model=base.model,
        pools=(base.pools[0], PoolConfig("decode", "decode", 2, num_cpus=0.5, engine=ENGINE)),
        router=router,
        transfer=base.transfer,
    )
    burst = _prompts((40,) * 8, seed=5)  # arrive together: pending prefill tokens reach 320
    after = _prompts((30,), seed=6)

    async def run():
        c = await Controller(cfg, FAST).start()
        try:
            reasons = _record_routes(c)
            got = await _generate_all(c, burst, "b")
            promoted_during = list(c.router.policy.drain_events())
            _assert_no_transfer_failed(await _assert_pools_full(c))
            # the burst is over: the next arrival sees no pressure and the worker goes back
            got_after = await _generate_all(c, after, "a")
            return got, got_after, reasons, promoted_during, list(c.router.policy.drain_events()), c.info()
        finally:
            await c.shutdown()

    got, got_after, reasons, during, back, info = loop.run_until_complete(run())
    assert got == reference("llama", burst) and got_after == reference("llama", after)
    # the first three prompts (120 tokens) go split; then one decode worker turns mixed and
    # prefills arrivals itself (token_jsq: its pending tokens are fewer than the prefill pool's)
    assert reasons[:4] == [RouteReason.SPLIT] * 3 + [RouteReason.MIXED], reasons
    assert [(e.old_role, e.new_role, e.reason) for e in during] == [("decode", "mixed", "prefill_saturated")]
    assert [(e.worker_id, e.old_role, e.new_role, e.reason) for e in back] == [
        (during[0].worker_id, "mixed", "decode", "pressure_ended")
    ]
    assert reasons[-1] == RouteReason.SPLIT
    assert {w.worker_id: w.current_role for w in info.workers} == {
        "prefill-0": "prefill",
        "decode-0": "decode",
        "decode-1": "decode",
    }


@pytest.mark.parametrize(
    "placement,error",
    [
        # the placement group cannot be placed: no node has both prefill_node and decode_node
        ("auto", r"STRICT_PACK placement group of 2 bundles .* not placed within 2s: one node must hold it"),
        # no placement group: the actors start on two nodes, then the locality check refuses them
        pytest.param("none", "'shm' is node-local but the workers run on 2 nodes", marks=pytest.mark.slow),
    ],
)
def test_shm_across_nodes_is_refused_and_cleaned_up(ray_nodes, loop, tiny_checkpoint, placement, error):
    cfg = _config(
        tiny_checkpoint("llama"),
        "shm",
        prefill={"resources": {"prefill_node": 1}},
        decode={"num_cpus": 0, "resources": {"decode_node": 1}},
    )
    cfg = ServeConfig.from_dict({**cfg.to_dict(), "placement": placement})
    options = dataclasses.replace(FAST, placement_timeout_s=2.0)

    async def run():
        c = Controller(cfg, options)
        with pytest.raises(RuntimeError, match=error):
            await c.start()
        return c

    c = loop.run_until_complete(run())
    assert c.workers == {} and c.router.workers == {}
    assert _live_groups() == []
    # the refused actors were killed: their resources come back (Ray frees them asynchronously)
    loop.run_until_complete(_poll(lambda: ray.available_resources().get("decode_node") == 1, "decode_node freed", 30))


@pytest.mark.slow
def test_killed_actors_are_replaced_and_serve_again(ray_nodes, loop, tiny_checkpoint, reference):
    engine = {"block_size": 16, "num_blocks": 64}  # room for one long request (1024 tokens)
    cfg = _config(tiny_checkpoint("llama"), "shm", prefill={"engine": engine}, decode={"engine": engine})
    prompts = _prompts((4, 10, 30), seed=3)
    expected = reference("llama", prompts)
    long_params = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
    long_prompt = _prompts((12,), seed=4)[0]
    long_expected = LLM(tiny_checkpoint("llama"), **engine).generate([long_prompt], long_params)[0].token_ids

    async def run():
        c = await Controller(cfg, FAST).start()
        try:
            old_address = c.workers["decode-0"].address
            # a request streaming from the decode worker when it dies waits for the replacement
            # and continues there (its tokens so far re-prefilled): nothing lost, nothing repeated
            stream = c.router.generate(RequestSpec("long", long_prompt, long_params))
            first = await anext(stream)
            assert first.token_ids and not first.finished
            ray.kill(c.workers["decode-0"].actor, no_restart=True)
            rest = [chunk async for chunk in stream]
            assert rest[-1].finish_reason == "length" and rest[-1].error is None, rest[-1]
            long_tokens = first.token_ids + [t for ch in rest for t in ch.token_ids]
            assert c.router.stats.failovers["worker_lost"] == 1 and c.router.stats.waits == 1

            await _poll(
                lambda: c.workers["decode-0"].restarts == 1, "decode-0 replaced", timeout=180
            )  # a new actor loads its model
            await c.wait_replaced("decode-0", timeout=60)
            assert c.workers["decode-0"].address != old_address  # a new receiver
            assert c.router.workers["decode-0"].healthy
            assert "unavailable" in c.workers["decode-0"].last_failure
            reasons = _record_routes(c)
            after_decode = await _generate_all(c, prompts, "d")
            assert reasons.count(RouteReason.SPLIT) == sum(len(p) >= SHORT for p in prompts)

            ray.kill(c.workers["prefill-0"].actor, no_restart=True)
            await _poll(lambda: c.workers["prefill-0"].restarts == 1, "prefill-0 replaced", timeout=180)
            await c.wait_replaced("prefill-0", timeout=60)
            reasons.clear()
            after_prefill = await _generate_all(c, prompts, "p")
            assert reasons.count(RouteReason.SPLIT) == sum(len(p) >= SHORT for p in prompts)
            # both workers were replaced and count from 0: nothing failed since
            _assert_no_transfer_failed(await _assert_pools_full(c, engine["num_blocks"]))
            return long_tokens, after_decode, after_prefill, c.info()
        finally:
            await c.shutdown()

    long_tokens, after_decode, after_prefill, info = loop.run_until_complete(run())
    assert long_tokens == long_expected
    assert after_decode == expected and after_prefill == expected
    assert {w.worker_id: (w.healthy, w.restarts) for w in info.workers} == {
        "prefill-0": (True, 1),
        "decode-0": (True, 1),
    }


def test_start_fails_loudly_when_a_worker_cannot_load(ray_nodes, loop, tmp_path):
    cfg = _config(str(tmp_path / "no-such-model"), "shm")

    async def run():
        c = Controller(cfg, FAST)
        with pytest.raises(RuntimeError, match="2 of 2 workers failed to start") as err:
            await c.start()
        return c, str(err.value)

    c, message = loop.run_until_complete(run())
    assert "prefill-0" in message and "decode-0" in message and "no-such-model" in message
    assert c.workers == {} and c.router.workers == {}
