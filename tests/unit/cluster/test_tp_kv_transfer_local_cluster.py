"""KV transfer between pools of different tensor-parallel degrees in the in-process LocalCluster.

Workers exchange whole-head pages: a TP decode worker's receiver cuts them by head for its
ranks (decode_worker/tp_kv_receiver.py), a TP prefill worker all-gathers them over its group
before sending (prefill_worker/tensor_parallel.py). Every prompt goes through the prefill
worker (no short-prompt path, no local fallback), in layer-wise and whole-cache mode, with a
prompt longer than the chunked-prefill budget (several chunks, a partial page re-sent) and a
client that goes away mid-stream. Greedy tokens must agree with engine.LLM (TP changes float
reduction order, so argmax agreement is measured: >= 99% of tokens, exact in practice), every
transfer must end DONE, and every rank's KV pool on both sides must be back to full."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams
from engine.runtime.tensor_parallel import TPWorker
from tests.router_streams import CancelledMidway, collect_ok

# 16 query / 8 KV heads: TP=2 divides (tests/correctness/test_tp_engine.py's model); odd vocab: uneven split
WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
# a 24-token step budget: the 30- and 45-token prompts prefill in several chunks
ENGINE = {
    "block_size": 8,
    "num_blocks": 64,
    "attention_backend": "sdpa",
    "skip_tokenizer_init": True,
    "max_num_batched_tokens": 24,
}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 85)), [5, 9, 2, 7], list(range(60, 90))]


@pytest.fixture(scope="module")
def wide_llama(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    want = [o.token_ids for o in LLM(ckpt, **ENGINE).generate(PROMPTS, GREEDY)]
    return ckpt, want


def _pools_of(cluster: LocalCluster, wid: str) -> list:
    """Every rank's block pool of worker ``wid`` (rank 0 first)."""
    worker = cluster.workers[wid]
    tw = cluster.tp_workers.get(wid)
    if tw is None:
        return [worker.engine.pool]
    assert isinstance(tw, TPWorker)
    return [tw.worker.engine.core.pool, *(f.engine.pool for f in tw.followers)]


async def _until_full(cluster: LocalCluster, wids: list[str]) -> list[tuple[int, int]]:
    """Poll until every rank's pool of ``wids`` is full (aborts and releases travel through the
    loops and the followers' queues) or 30 s pass -> [(free, total)] per pool."""
    deadline = asyncio.get_running_loop().time() + 30.0
    while True:
        pools = [p for w in wids for p in _pools_of(cluster, w)]
        state = [(p.num_free, p.num_blocks) for p in pools]
        if all(f == t for f, t in state) or asyncio.get_running_loop().time() > deadline:
            return state
        await asyncio.sleep(0.05)  # poll interval


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    assert [len(g) for g in got] == [len(w) for w in want]
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    return same / sum(len(w) for w in want)


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "layerwise", "kind"),
    [
        (1, 2, True, "loopback"),
        (1, 2, False, "loopback"),
        (2, 1, True, "loopback"),
        (2, 1, False, "loopback"),
        (1, 2, True, "shm"),  # by reference out of a shared prefill cache, cut by head on arrival
        (2, 1, True, "grpc"),
        (1, 2, False, "torch"),  # torch.distributed p2p (gloo): the sink's rank-0 cache picks the backend
        (2, 2, True, "loopback"),
    ],
    ids=[
        "p1-d2-layerwise",
        "p1-d2-whole",
        "p2-d1-layerwise",
        "p2-d1-whole",
        "p1-d2-layerwise-shm",
        "p2-d1-layerwise-grpc",
        "p1-d2-whole-torch",
        "p2-d2-layerwise",
    ],
)
def test_kv_moves_between_tp_degrees_and_decodes_as_llm(wide_llama, prefill_tp, decode_tp, layerwise, kind) -> None:
    ckpt, want = wide_llama
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=ENGINE, tensor_parallel=prefill_tp),
            PoolConfig("decode", "decode", 1, engine=ENGINE, tensor_parallel=decode_tp),
        ),
        router=RouterConfig(short_prompt_threshold=0, fallback_local_prefill=False, max_mixed_workers=0),
        transfer=TransferConfig(kind=kind, layerwise=layerwise),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=30.0).start()
        try:
            gone = CancelledMidway(cluster.router, "gone", PROMPTS[0]).start()  # a client that goes away mid-stream
            got = await asyncio.gather(*(collect_ok(cluster.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            await gone.cancel()
            pools = await _until_full(cluster, ["prefill-0", "decode-0"])
            prefill, decode = cluster.workers["prefill-0"].stats(), cluster.workers["decode-0"].stats()
            followers = [f for tw in cluster.tp_workers.values() for f in tw.followers]
            return got, pools, prefill, decode, [f.failure() for f in followers], len(cluster.router.requests)
        finally:
            await cluster.stop()

    got, pools, prefill, decode, follower_failures, in_flight = asyncio.run(run())
    agreement = _agreement(got, want)
    print(
        f"P TP={prefill_tp} -> D TP={decode_tp} layerwise={layerwise} {kind}: token agreement with LLM {agreement:.4f}"
    )
    assert agreement >= 0.99, (agreement, got, want)
    assert pools and all(free == total > 0 for free, total in pools), pools
    assert len(pools) == prefill_tp + decode_tp
    assert follower_failures == [None] * (prefill_tp + decode_tp - 2)
    assert in_flight == 0
    # every prompt (and the cancelled one) crossed the link, and every transfer ended DONE
    assert prefill.transfer_failures == decode.transfer_failures == 0
    whole_page = 2 * ENGINE["block_size"] * WIDE["num_key_value_heads"] * (WIDE["hidden_size"] // 16) * 4
    assert prefill.transfer_bytes >= sum(-(-len(p) // 8) for p in PROMPTS) * whole_page * 2  # >= 2 layers' pages
    assert prefill.transfer_bytes % whole_page == 0  # whole-head pages on the wire, whatever the TP degrees


def test_a_dead_prefill_rank_fails_its_worker_at_once_and_the_prompts_fail_over(wide_llama) -> None:
    """A TP prefill worker whose follower rank is gone fails its next step before any collective
    (TPFollowerFailed, not a group timeout); the router places its prompts again on the other
    prefill worker, and the tokens are still LLM's."""
    ckpt, want = wide_llama
    timeout_s = 30.0
    cfg = ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 2, engine=ENGINE, tensor_parallel=2),
            PoolConfig("decode", "decode", 1, engine=ENGINE, tensor_parallel=2),
        ),
        router=RouterConfig(short_prompt_threshold=0, fallback_local_prefill=False, max_mixed_workers=0),
        transfer=TransferConfig(kind="loopback"),
    )

    async def run():
        cluster = await LocalCluster(cfg, ep_group_timeout_s=timeout_s).start()
        try:
            cluster.tp_workers["prefill-0"].followers[0].stop(10.0)  # rank 1 of prefill-0 is gone
            t0 = asyncio.get_running_loop().time()
            got = await asyncio.gather(*(collect_ok(cluster.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            elapsed = asyncio.get_running_loop().time() - t0
            return got, elapsed, cluster.router.stats.failovers["worker_lost"], cluster.router.workers["prefill-0"]
        finally:
            await cluster.stop()

    got, elapsed, lost, dead = asyncio.run(run())
    assert got == want
    assert lost >= 1  # token_jsq spreads 5 prompts over both prefill workers: some hit the dead one
    assert not dead.healthy
    assert elapsed < timeout_s, f"{elapsed:.1f} s: a collective waited for the dead rank"
