"""DecodeAPI: what the control plane calls on a decode (or mixed) worker (see engine.runtime.api).

A transferred request: ``start_transfer`` (reserve blocks, expect the KV) ->
``set_first_token`` (the prefill's result) -> ``read`` from cursor 1 until finished.
A request prefilled here (short prompt, mixed role): ``generate_local`` -> ``read`` from 0.

Failover: ``emitted`` are tokens the request already generated on a worker that failed. They
are re-prefilled after the prompt and count as output (``max_tokens``, stop strings and
seeded sampling continue from them); the request's stream holds them first, so a transferred
continuation is read from ``len(emitted) + 1`` and a local one from ``len(emitted)``.

Expert parallelism: a worker built as an EP rank (pool ``experts`` > 1) serves nothing until
the controller forms its group (cluster/control/groups.py ``form_group`` over the pool's
handles): ``node_ip`` / ``free_port`` (rank 0 hosts the rendezvous) -> ``join_group`` on every
rank at once.

Bounds: a worker holds at most its ``max_pending`` requests (waiting for blocks or KV,
queued, running); one more is refused with ``queue.Full``, never queued without bound.
"""

from __future__ import annotations

import abc

from engine.runtime.api import GroupMemberAPI, WorkerAPI
from engine.types import KV_TRANSFER_FAILED, KV_TRANSFER_TIMED_OUT, FirstToken, KVAddress, RequestSpec, StreamChunk

__all__ = ["KV_TRANSFER_FAILED", "KV_TRANSFER_TIMED_OUT", "DecodeAPI"]


class DecodeAPI(WorkerAPI, GroupMemberAPI):
    """``join_group`` (GroupMemberAPI): an EP rank's group (then the worker steps in lock-step
    with it), a model worker's attention group, or rank 0's tensor-parallel group
    ``tp/<worker id>``."""

    @abc.abstractmethod
    def kv_address(self) -> KVAddress:
        """Where prefill workers send this worker's KV (its receiver's address). None: the
        address is per request, returned by ``start_transfer`` (an attention model worker,
        whose requests' KV goes straight to the attention worker holding them)."""

    @abc.abstractmethod
    def start_transfer(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> KVAddress | None:
        """Prepare to receive the KV of ``spec``'s prompt (and of ``emitted``): reserve blocks
        (queued FIFO while the pool is full) and open the request's stream. Returns where the
        prefill worker sends it: None = ``kv_address()``; a worker whose ``kv_address()`` is
        None returns the request's own address (its callers wait for it before the prefill).
        Raises queue.Full at the worker's bound."""

    @abc.abstractmethod
    def set_first_token(self, request_id: str, first: FirstToken) -> None:
        """The prefill worker's first token; the request is admitted once its KV has landed."""

    @abc.abstractmethod
    def generate_local(self, spec: RequestSpec, emitted: tuple[int, ...] = ()) -> None:
        """Prefill (prompt + ``emitted``) and decode ``spec`` here (no transfer). Raises
        queue.Full at the worker's bound."""

    @abc.abstractmethod
    def read(self, request_id: str, cursor: int = 0, timeout: float | None = 1.0) -> StreamChunk:
        """Tokens of the request from ``cursor`` on, waiting up to ``timeout`` for news.
        Raises UnknownRequest for an id this worker does not hold."""

    @abc.abstractmethod
    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """End the request here with ``reason`` (frees its blocks; readers see "abort")."""

    @abc.abstractmethod
    def set_speculation_pressure(self, pressure: float) -> None:
        """Queueing at the decode pool (>= 0, from the router): a speculating worker's policy
        prices speculative work up by it and turns speculation off under load. No-op on a
        worker that does not speculate."""
