"""Build a DecodeWorker from plain options (used by actor.py and in-process clusters)."""

from __future__ import annotations

from typing import Any

from decode_worker.worker import DecodeWorker
from engine.engine import EngineCore
from engine.llm import build_engine_config
from engine.models.gguf import resolve_model_path
from engine.tokenizer import load_tokenizer
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
) -> DecodeWorker:
    """``transport=None`` builds a worker without a receiver (mixed/colocated use only)."""
    model = resolve_model_path(model)  # a .gguf converts once (cached); every later call reuses it
    opts = {k: v for k, v in (engine_options or {}).items() if k != "mode"}
    skip_tokenizer_init = bool(opts.pop("skip_tokenizer_init", False))
    engine = EngineCore(build_engine_config(model, **opts, mode="decode_only"), progress=True)
    receiver = (
        None
        if transport is None
        else make_receiver(transport, engine.layout, engine.cache, **(transport_options or {}))
    )
    return DecodeWorker(
        engine,
        receiver,
        tokenizer=load_tokenizer(model, skip_tokenizer_init),
        worker_id=worker_id,
        transfer_timeout_s=transfer_timeout_s,
        role=role,
        max_pending=max_pending,
    )
