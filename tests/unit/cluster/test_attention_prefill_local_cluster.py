"""A prefill pool beside an attention pool, in process: LocalCluster with 1 prefill worker, 1
decode worker (the model worker) and 2 attention workers. Every prompt is transferred
(short_prompt_threshold 0): the prefill worker pushes its KV straight into the attention worker
the model worker placed the request on (decode_worker/attention_receiver.py), layer by layer or
at the end. Greedy streams equal engine.LLM; both attention workers' receivers took pages,
the model worker took none; every pool is full again after the streams, a cancel and a
corrupted transfer (which fails its attempt cleanly and is retried with a fresh one)."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from attention_offload.shard_kv import FAILED_CODE
from cluster.config import ServeConfig
from cluster.control.local import LocalCluster
from decode_worker.attention_receiver import AttentionKVReceiver
from engine import SamplingParams
from engine.types import RequestSpec
from kv_transfer import TransferStatus
from kv_transfer.base import KVChunk
from tests.kv_faults import flipped
from tests.router_streams import collect_ok
from tests.unit.cluster.attention_cluster import (
    ATTN_BLOCKS,
    DEADLINE_S,
    GREEDY,
    attention_config,
    pools_full,
    reference,
)

PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 59)), [5, 9, 2, 7], list(range(60, 90))]


def _config(ckpt: str, kind: str = "loopback", layerwise: bool = True) -> ServeConfig:
    return attention_config(ckpt, 1, 2, kind, layerwise)


async def _pools_full(cluster: LocalCluster) -> None:
    await pools_full(cluster, ["decode-0"], 2)


def _model_receiver(cluster: LocalCluster) -> AttentionKVReceiver:
    receiver = cluster.workers["decode-0"].receiver
    assert isinstance(receiver, AttentionKVReceiver)
    return receiver


@pytest.mark.parametrize(
    ("kind", "layerwise", "family"),
    [
        ("loopback", True, "llama"),
        ("loopback", False, "llama"),
        ("shm", True, "llama"),
        ("loopback", True, "qwen2_moe"),
    ],
    ids=["loopback-layerwise", "loopback-whole", "shm-layerwise", "moe-loopback-layerwise"],
)
def test_prefill_pushes_kv_straight_to_the_attention_workers(
    tiny_checkpoint, kind: str, layerwise: bool, family: str
) -> None:
    ckpt = tiny_checkpoint(family)

    async def run():
        cluster = await LocalCluster(_config(ckpt, kind, layerwise), ep_group_timeout_s=30.0).start()
        try:
            model = cluster.workers["decode-0"]
            assert model.kv_address() is None  # no receiver of its own: per request
            addresses = [a.kv_address for a in cluster.info().attention_workers]
            assert all(a is not None for a in addresses) and len(set(addresses)) == 2
            got = await asyncio.gather(*(collect_ok(cluster.router, f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)))
            await _pools_full(cluster)
            info = cluster.info()
            polls = _model_receiver(cluster).polls
            # the model worker's own (placeholder) KV pages were never written
            untouched = not model.engine.cache.kv.any().item()
        finally:
            await cluster.stop()
        return got, info, polls, untouched

    got, info, polls, untouched = asyncio.run(run())
    assert got == reference(ckpt, PROMPTS)
    by_id = {w.worker_id: w.stats for w in info.workers}
    assert by_id["prefill-0"].transfer_bytes > 0
    received = [a.kv_bytes_received for a in info.attention_workers]
    assert all(b > 0 for b in received), received  # 5 requests, placed on the most free shard: both
    assert sum(received) == by_id["prefill-0"].transfer_bytes  # every byte sent landed on a shard
    assert by_id["decode-0"].transfer_failures == 0 and polls > 0 and untouched


def test_cancels_mid_transfer_and_mid_stream_and_a_corrupted_transfer_free_every_pool(tiny_checkpoint) -> None:
    """A client that goes away while its KV is on the wire (the attention worker's receiver
    forgets it: once the CANCEL is applied, the late chunks are dropped unwritten), one that goes away after its first
    token, and a transfer whose first chunk is corrupted (the attention worker's receiver fails
    it at its checksum, the model worker aborts the attempt and frees its blocks, the router
    retries it with a fresh transfer, equal to engine.LLM): afterwards every pool is full and
    no transfer is left anywhere."""
    ckpt = tiny_checkpoint("llama")
    corrupted: list[str] = []
    held, release = threading.Event(), threading.Event()

    def faults(chunk: KVChunk) -> KVChunk:
        if chunk.request_id == "slow" and not held.is_set():  # its first chunk waits on the wire
            held.set()
            release.wait(DEADLINE_S)
        if chunk.request_id != "bad" or corrupted:  # only the first chunk of "bad"'s first attempt
            return chunk
        corrupted.append(chunk.request_id)
        return flipped(chunk)

    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def wait_for(cond, what: str) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE_S
        while not cond():
            assert loop.time() < end, what
            await asyncio.sleep(0.01)  # poll interval

    async def run():
        cluster = LocalCluster(_config(ckpt), ep_group_timeout_s=30.0, transport_options={"fault_hook": faults})
        await cluster.start()
        model = cluster.workers["decode-0"]
        try:
            # 1. cancelled while its first chunk is on the wire
            task = asyncio.ensure_future(collect_ok(cluster.router, "slow", PROMPTS[4], GREEDY))
            await wait_for(held.is_set, "the first chunk of 'slow' was never sent")
            assert model.stats().transfers_in_flight == 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_for(lambda: model.stats().transfers_in_flight == 0, "the model worker kept the transfer")
            # CANCEL is fire-and-forget; a POLL after it on the same ordered channel returns once
            # the attention workers applied it: neither expects "slow" any more
            transport = _model_receiver(cluster).transport
            forgotten = model.loop.run(lambda: [transport.kv_poll(s, ["slow"])[0] for s in range(2)])
            assert all(code == FAILED_CODE and "not expected" in why for code, why in forgotten), forgotten
            bytes_before = sum(a.kv_bytes_received for a in cluster.info().attention_workers)
            release.set()  # the late chunk reaches a receiver that forgot the request
            await _pools_full(cluster)
            late = sum(a.kv_bytes_received for a in cluster.info().attention_workers) - bytes_before
            # 2. a client that reads one token and goes away
            gen = cluster.router.generate(RequestSpec("gone", PROMPTS[4], long))
            first = await gen.__anext__()
            assert first.token_ids and first.error is None
            await gen.aclose()
            # 3. a corrupted transfer
            bad = await collect_ok(cluster.router, "bad", PROMPTS[2], GREEDY)
            await _pools_full(cluster)
            workers = cluster.info().workers
            stats = cluster.router.stats
        finally:
            release.set()
            await cluster.stop()
        return late, bad, workers, stats

    late, bad, workers, stats = asyncio.run(run())
    assert late == 0  # the cancelled request's chunk was dropped, not written
    assert corrupted == ["bad"]
    assert bad == reference(ckpt, [PROMPTS[2]])[0]
    assert stats.failovers["kv_checksum"] == 1
    model = next(w.stats for w in workers if w.worker_id == "decode-0")
    assert model.transfer_failures == 1


def test_the_receiver_proxy_reports_a_refused_expect_as_failed(tiny_checkpoint) -> None:
    """The model worker's AttentionKVReceiver over the group: an EXPECT the attention worker
    refuses (a page outside its shard) comes back FAILED with the reason; a good one stays
    BOOTSTRAPPING until its KV arrives; CANCEL forgets both (a second poll: KeyError)."""
    ckpt = tiny_checkpoint("llama")

    async def run():
        cluster = await LocalCluster(_config(ckpt), ep_group_timeout_s=30.0).start()
        try:
            model = cluster.workers["decode-0"]
            receiver = _model_receiver(cluster)

            def drive():
                # engine block ids of shard 1 start at ATTN_BLOCKS; a page past it does not exist there
                receiver.expect("ok", [ATTN_BLOCKS + 2, ATTN_BLOCKS + 3])
                receiver.backend.kv_partitions = [ATTN_BLOCKS, ATTN_BLOCKS + 4]  # let a bad id through
                try:
                    receiver.expect("bad", [2 * ATTN_BLOCKS + 1])
                finally:
                    receiver.backend.kv_partitions = [ATTN_BLOCKS, ATTN_BLOCKS]
                states = receiver.poll_many(["ok", "bad"])
                why = receiver.error("bad")
                receiver.cancel("ok")
                receiver.cancel("bad")
                with contextlib.suppress(KeyError):
                    receiver.poll("ok")
                    return states, why, False
                return states, why, True

            return model.loop.run(drive)  # the group's messages go from the loop thread
        finally:
            await cluster.stop()

    states, why, forgotten = asyncio.run(run())
    assert states == {"ok": TransferStatus.BOOTSTRAPPING, "bad": TransferStatus.FAILED}
    assert "attention-1 refused the transfer" in why and "block ids must be unique and in [0, 24)" in why
    assert forgotten
