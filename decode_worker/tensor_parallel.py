"""A tensor-parallel decode/mixed worker in one process: N EngineCore shards, one routed worker.

Rank 0 is the routed DecodeWorker; its engine is a ``TPLeaderEngine`` wrapping rank 0's
``EngineCore(tensor_parallel=comm)``, ranks 1..N-1 are ``TPFollower`` threads replaying its
engine calls (engine/runtime/tensor_parallel.py: the calls, the leader, the followers, the
SPMD invariant and how a failed rank fails the worker).

KV from prefill workers (any TP degree): the worker's KV receiver (``transport``) listens with
the whole layout (every KV head of the model, ``KVLayout.whole()``) and writes through a
``TPPageSink`` (decode_worker/tp_kv_receiver.py), which cuts each received page by head: rank
0's heads into its cache, rank r's sent to follower r as a WriteKV call.

Lifecycle: ``build_tp_decode_worker`` joins the group ``tp/<worker id>`` (gloo, one thread
per rank), builds the N shards concurrently, starts the followers and returns the worker
with its followers (a TPWorker); ``stop_followers`` after the worker's shutdown ends the
follower threads. On Ray each rank is an actor (engine/runtime/tp_follower.py, actor.py).
Not with EP, attention offload or speculation (EngineCore refuses them with tensor_parallel).
"""

from __future__ import annotations

from typing import Any

from decode_worker.tp_kv_receiver import TPPageSink
from decode_worker.worker import DecodeWorker
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, TPWorker, build_tp_cores
from engine.tokenizer import load_tokenizer
from kv_transfer import make_receiver


def build_tp_decode_worker(
    model: str,
    engine_options: dict[str, Any] | None,
    world_size: int,
    worker_id: str,
    role: str = "decode",
    max_pending: int = 512,
    group_timeout_s: float = 30.0,
    host: str = "127.0.0.1",
    transport: str | None = None,
    transport_options: dict[str, Any] | None = None,
    transfer_timeout_s: float = 60.0,
) -> TPWorker[DecodeWorker]:
    """N = ``world_size`` shards in this process over the gloo group ``tp/<worker_id>`` (module
    docstring); ``transport`` None: no KV receiver (the worker prefills its own prompts).
    Raises GroupJoinError if a rank cannot join, TPDivisibilityError (ValueError) for a degree
    the model cannot take."""
    model = resolve_model_path(model)
    opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
    skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
    config = build_engine_config(model, **opts, mode="decode_only")
    name = f"tp/{worker_id}"
    cores = build_tp_cores(config, world_size, name, group_timeout_s, host)
    followers = [TPFollower(cores[r], f"{name}#{r}") for r in range(1, world_size)]
    receiver = None
    if transport is not None:
        sink = TPPageSink(cores[0], list(followers))
        receiver = make_receiver(transport, sink.layout, sink, **(transport_options or {}))
    worker = DecodeWorker(
        TPLeaderEngine(cores[0], list(followers)),  # type: ignore[arg-type]  # an EngineCore to the worker
        receiver,
        tokenizer=load_tokenizer(model, skip_tokenizer_init),
        worker_id=worker_id,
        transfer_timeout_s=transfer_timeout_s,
        role=role,
        max_pending=max_pending,
    )
    return TPWorker(worker, followers)
