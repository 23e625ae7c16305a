"""DecodeAPI: what the control plane calls on a decode (or mixed) worker (see engine.runtime.api).

A transferred request: ``start_transfer`` (reserve blocks, expect the KV) ->
``set_first_token`` (the prefill's result) -> ``read`` from cursor 1 until finished.
A request prefilled here (short prompt, mixed role): ``generate_local`` -> ``read`` from 0.
"""

from __future__ import annotations

import abc

from engine.runtime.api import WorkerAPI
from engine.types import FirstToken, KVAddress, RequestSpec, StreamChunk


class DecodeAPI(WorkerAPI):
    @abc.abstractmethod
    def kv_address(self) -> KVAddress:
        """Where prefill workers send this worker's KV (its receiver's address)."""

    @abc.abstractmethod
    def start_transfer(self, spec: RequestSpec) -> None:
        """Prepare to receive ``spec``'s prompt KV: reserve blocks (queued FIFO while the pool
        is full) and open the request's stream."""

    @abc.abstractmethod
    def set_first_token(self, request_id: str, first: FirstToken) -> None:
        """The prefill worker's first token; the request is admitted once its KV has landed."""

    @abc.abstractmethod
    def generate_local(self, spec: RequestSpec) -> None:
        """Prefill and decode ``spec`` here (no transfer)."""

    @abc.abstractmethod
    def read(self, request_id: str, cursor: int = 0, timeout: float | None = 1.0) -> StreamChunk:
        """Tokens of the request from ``cursor`` on, waiting up to ``timeout`` for news.
        Raises UnknownRequest for an id this worker does not hold."""

    @abc.abstractmethod
    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """End the request here with ``reason`` (frees its blocks; readers see "abort")."""
