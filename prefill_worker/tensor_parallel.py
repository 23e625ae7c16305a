"""A tensor-parallel prefill worker in one process: N EngineCore shards, one routed worker.

Rank 0 is the routed PrefillWorker; its engine is a ``TPLeaderEngine`` over rank 0's
``EngineCore(tensor_parallel=comm)``, ranks 1..N-1 are ``TPFollower`` threads replaying its
engine calls (engine/runtime/tensor_parallel.py).

KV out: workers exchange whole-head pages (``KVLayout.whole()``), so the senders are built with
the whole layout and every page sent is gathered over the TP group first (``gather_kv``: a
collective, the followers are sent GatherKV before rank 0 runs it). Pages therefore always go
as copies (``sender.send``; no by-reference shm path, no pinning: the gathered tensor is the
sender's). Layer-wise mode pushes a step's pages after the step (the leader runs the layer
hook layer by layer once the step is done, see TPLeaderEngine.step); the pages were gathered
during the step, layer by layer as each layer wrote them (``TPLeaderEngine.step_pages``), and
only pages outside the step's (a preempted request's, resent from page 0) are gathered after
it, per request once for all layers; whole-cache mode gathers a finished prompt's pages once. Gathers run on rank 0's loop thread right after the step that wrote the pages, before
any later step could change them.

Lifecycle: ``build_tp_prefill_worker`` joins the group ``tp/<worker id>`` (gloo, one thread
per rank), builds the N shards, starts the followers and returns a TPWorker;
``stop_followers`` after the worker's shutdown ends the follower threads.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.kv_cache.step_gather import StepKVPages
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, TPWorker, build_tp_cores
from engine.tokenizer import load_tokenizer
from kv_transfer import make_sender
from prefill_worker.worker import PrefillWorker, _Outgoing


class TPPrefillWorker(PrefillWorker):
    """A PrefillWorker over a TPLeaderEngine: it sends whole pages gathered over the TP group."""

    engine: TPLeaderEngine  # type: ignore[assignment]

    def __init__(self, engine: TPLeaderEngine, *args: Any, **kwargs: Any):
        super().__init__(engine, *args, **kwargs)  # type: ignore[arg-type]
        # pages gathered after the step, by block ids (every layer, whole heads); emptied at
        # every step (a later step may change the pages)
        self._gathered: dict[tuple[int, ...], StepKVPages] = {}

    def _step(self) -> None:
        self._gathered.clear()
        try:
            super()._step()
        finally:
            self._gathered.clear()

    def _whole_pages(self, layer: int, blocks: list[int]) -> torch.Tensor:
        """[n, 2, block_size, H_kv, D]: gathered during the step (layer-wise mode), else after it."""
        step = self.engine.step_pages
        if step is not None and (pages := step.pages(layer, blocks)) is not None:
            return pages
        key = tuple(blocks)
        gathered = self._gathered.get(key)
        if gathered is None:
            gathered = self._gathered[key] = self.engine.gather_kv(blocks)
        pages = gathered.pages(layer, blocks)
        assert pages is not None  # every block of ``blocks`` was gathered
        return pages

    def _send_fixed(self, o: _Outgoing, rid: str, layer: int, first: int, blocks: list[int]) -> None:
        self._send_copy(o, rid, layer, first, blocks)

    def _send_copy(self, o: _Outgoing, rid: str, layer: int, first: int, blocks: list[int]) -> None:
        self._sent(o, len(blocks))
        o.sender.send(rid, layer, first, self._whole_pages(layer, blocks))  # never written again
        o.chunks += 1


def build_tp_prefill_worker(
    model: str,
    engine_options: dict[str, Any] | None,
    world_size: int,
    worker_id: str,
    transport: str = "shm",
    transport_options: dict[str, Any] | None = None,
    layerwise: bool = True,
    transfer_timeout_s: float = 60.0,
    max_pending: int = 512,
    group_timeout_s: float = 30.0,
    host: str = "127.0.0.1",
) -> TPWorker[TPPrefillWorker]:
    """N = ``world_size`` shards in this process over the gloo group ``tp/<worker_id>`` (module
    docstring). Raises GroupJoinError if a rank cannot join, TPDivisibilityError (ValueError)
    for a degree the model cannot take."""
    model = resolve_model_path(model)
    opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
    skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
    config = build_engine_config(model, **opts, mode="prefill_only")
    name = f"tp/{worker_id}"
    cores = build_tp_cores(config, world_size, name, group_timeout_s, host)
    followers = [TPFollower(cores[r], f"{name}#{r}") for r in range(1, world_size)]
    leader = TPLeaderEngine(cores[0], list(followers))
    whole = leader.whole_layout
    worker = TPPrefillWorker(
        leader,
        lambda: make_sender(transport, whole, **(transport_options or {})),
        tokenizer=load_tokenizer(model, skip_tokenizer_init),
        layerwise=layerwise,
        worker_id=worker_id,
        transfer_timeout_s=transfer_timeout_s,
        max_pending=max_pending,
    )
    return TPWorker(worker, followers)
