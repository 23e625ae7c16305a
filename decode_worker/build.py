"""Build a DecodeWorker from plain options (used by actor.py and in-process clusters)."""

from __future__ import annotations

from typing import Any

from attention_offload.build import shard_layout
from attention_offload.dist_transport import DistAttentionTransport
from attention_offload.offloaded import OffloadedEngine
from decode_worker.attention_receiver import AttentionKVReceiver
from decode_worker.tp_kv_receiver import TPPageSink
from decode_worker.worker import DecodeWorker
from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.parallel import DeferredCommunicator
from engine.runtime.tensor_parallel import TPFollowerLink
from engine.runtime.tp_follower import build_leader
from engine.tokenizer import load_tokenizer
from expert_router.dispatcher import EPDispatcher
from expert_router.group import EPRankOptions, build_serving_ep_engine
from kv_transfer import make_receiver


def build_decode_worker(
    model: str,
    engine_options: dict[str, Any] | None = None,
    transport: str | None = "shm",
    transport_options: dict[str, Any] | None = None,
    worker_id: str = "decode-0",
    transfer_timeout_s: float = 60.0,
    role: str = "decode",
    max_pending: int = 512,
    ep: EPRankOptions | None = None,
    node_ip: str = "127.0.0.1",
    attention_blocks: list[int] | None = None,
    attention_rotation: int = 2,
    tp_followers: list[TPFollowerLink] | None = None,
) -> DecodeWorker:
    """``transport=None`` builds a worker without a receiver (mixed/colocated use only).

    ``ep``: the worker is that rank of an EP group (expert_router/group.EPRankOptions): it
    loads only its share of the routed experts (a fast tier, LRU, or ExpertFlow's predictor
    fitted on the routing log, with ``cache_slots``) and serves once ``join_group`` formed the
    group.
    Raises EPSetupError naming the pool field when the settings do not fit the model.

    ``attention_blocks`` (one block count per attention worker, rank 1..N): the worker is the
    model worker of an attention pool: an OffloadedEngine (``attention_rotation`` micro-batches)
    whose pool is the attention workers' total, over a torch.distributed transport connected
    by ``join_group``; with a ``transport`` its receiver is an AttentionKVReceiver: a prefill
    worker's KV goes straight to the attention worker holding the request (their receivers are
    built with that transport kind), the model worker only drives them.

    ``tp_followers`` (ranks 1..N-1 of a tensor-parallel worker of degree N, e.g.
    engine/runtime/tp_follower.RemoteFollower): the worker is rank 0, its engine a
    TPLeaderEngine over rank 0's shard, built on a DeferredCommunicator that ``join_group``
    connects (the group ``tp/<worker_id>``); its KV receiver (with a ``transport``) writes
    through decode_worker/tp_kv_receiver.TPPageSink: rank 0's heads into its cache, each
    follower's as a WriteKV call."""
    model = resolve_model_path(model)  # a .gguf converts once (cached); every later call reuses it
    opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
    skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
    config = build_engine_config(model, **opts, mode="decode_only")
    dispatcher: EPDispatcher | None = None
    attention: OffloadedEngine | None = None
    tp_comm: DeferredCommunicator | None = None
    tp_sink: TPPageSink | None = None
    if tp_followers:
        if ep is not None or attention_blocks is not None:
            raise ValueError("a tensor-parallel worker is not an EP rank or an attention-offloaded model worker")
        engine, tp_comm = build_leader(config, tp_followers, worker_id)
        tp_sink = TPPageSink(engine.core, list(tp_followers))  # whole-head pages in, each rank's heads out
    elif attention_blocks is not None:
        if ep is not None:
            raise ValueError("an attention-offloaded model worker is not an EP rank")
        ranks = list(range(1, len(attention_blocks) + 1))
        attention = OffloadedEngine(
            config, DistAttentionTransport(None, ranks, shard_layout(config)), attention_blocks, attention_rotation
        )
        engine = attention.core
    elif ep is not None:
        engine, dispatcher = build_serving_ep_engine(config, ep)
    else:
        engine = EngineCore(config, progress=True)
    if transport is None:
        receiver = None
    elif attention is not None:  # the pages land on the attention workers; this one drives them
        assert isinstance(attention.transport, DistAttentionTransport)
        receiver = AttentionKVReceiver(shard_layout(config), attention.backend, attention.transport)
    elif tp_sink is not None:  # the prefill worker sends whole-head pages; the sink cuts them per rank
        receiver = make_receiver(transport, tp_sink.layout, tp_sink, **(transport_options or {}))
    else:
        receiver = make_receiver(transport, engine.layout, engine.cache, **(transport_options or {}))
    return DecodeWorker(
        engine,
        receiver,
        tokenizer=load_tokenizer(model, skip_tokenizer_init),
        worker_id=worker_id,
        transfer_timeout_s=transfer_timeout_s,
        role=role,
        max_pending=max_pending,
        dispatcher=dispatcher,
        node_ip=node_ip,
        attention=attention,
        tp_comm=tp_comm,
    )
