"""Build a PrefillWorker from plain options (used by actor.py and in-process clusters)."""

from __future__ import annotations

from typing import Any

from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.runtime.tensor_parallel import TPFollowerLink
from engine.runtime.tp_follower import build_leader
from engine.tokenizer import load_tokenizer
from expert_router.group import EPRankOptions, build_serving_ep_engine
from kv_transfer import make_sender
from prefill_worker.tensor_parallel import TPPrefillWorker
from prefill_worker.worker import PrefillWorker


def build_prefill_worker(
    model: str,
    engine_options: dict[str, Any] | None = None,
    transport: str = "shm",
    transport_options: dict[str, Any] | None = None,
    worker_id: str = "prefill-0",
    layerwise: bool = True,
    transfer_timeout_s: float = 60.0,
    max_pending: int = 512,
    node_ip: str = "127.0.0.1",
    tp_followers: list[TPFollowerLink] | None = None,
    ep: EPRankOptions | None = None,
) -> PrefillWorker:
    """``tp_followers`` (ranks 1..N-1 of a tensor-parallel worker of degree N, e.g.
    engine/runtime/tp_follower.RemoteFollower): the worker is rank 0, a TPPrefillWorker
    (prefill_worker/tensor_parallel.py: it sends whole-head pages all-gathered over the
    group) over a shard built on a DeferredCommunicator that ``join_group`` connects.

    ``ep``: the worker is that rank of an EP group of prefill workers (expert_router/group.
    EPRankOptions): it loads only its share of the routed experts and prefills once
    ``join_group`` formed the group. Raises EPSetupError naming the pool field when the
    settings do not fit the model."""
    model = resolve_model_path(model)  # a .gguf converts once (cached); every later call reuses it
    opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
    skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
    if tp_followers:
        if ep is not None:
            raise ValueError("a tensor-parallel prefill worker is not an EP rank")
        config = build_engine_config(model, **opts, mode="prefill_only")
        leader, tp_comm = build_leader(config, tp_followers, worker_id)
        whole = leader.whole_layout  # pages go out whole (gathered), whatever the TP degrees
        return TPPrefillWorker(
            leader,
            lambda: make_sender(transport, whole, **(transport_options or {})),
            tokenizer=load_tokenizer(model, skip_tokenizer_init),
            layerwise=layerwise,
            worker_id=worker_id,
            transfer_timeout_s=transfer_timeout_s,
            max_pending=max_pending,
            node_ip=node_ip,
            tp_comm=tp_comm,
        )
    if transport == "shm" and str(opts.get("device", "cpu")).split(":")[0] == "cpu":
        # the decode worker copies pages straight out of this cache (one copy, not two)
        opts.setdefault("kv_cache_shared", True)
    config = build_engine_config(model, **opts, mode="prefill_only")
    dispatcher = None
    if ep is not None:
        engine, dispatcher = build_serving_ep_engine(config, ep)
    else:
        engine = EngineCore(config, progress=True)
    return PrefillWorker(
        engine,
        lambda: make_sender(transport, engine.layout, **(transport_options or {})),
        tokenizer=load_tokenizer(model, skip_tokenizer_init),
        layerwise=layerwise,
        worker_id=worker_id,
        transfer_timeout_s=transfer_timeout_s,
        max_pending=max_pending,
        node_ip=node_ip,
        dispatcher=dispatcher,
    )
