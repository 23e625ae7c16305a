"""AttentionKVReceiver: an attention model worker's KVReceiver, whose pages land on its
attention workers.

A model worker (DecodeWorker over an OffloadedEngine) holds no KV pages: request r's pages
are page ids of ONE attention worker s (its engine's sub-pool s, attention_offload/shard.py).
So a prefill worker pushes r's KV straight to attention worker s's own KV receiver
(attention_offload/shard_kv.py), never through the model worker, and this class is what the
DecodeWorker's unchanged transfer bookkeeping (reserve -> expect -> poll DONE + first token
-> admit; FAILED / timeout / abort -> cancel, blocks freed) talks to instead of a local
receiver:

    expect(rid, engine blocks)   -> EXPECT(rid, pages) to the blocks' shard (fire-and-forget)
    poll_many(rids)              -> one POLL per shard holding some of them (one round trip
                                    per shard, not per request); poll(rid) = poll_many([rid])
    error(rid)                   the reason the last poll brought back
    cancel(rid)                  -> CANCEL(rid) to its shard (nothing if never expected)
    address                      None: this worker receives nothing itself; the address a
                                 request's KV goes to is its shard's (``address_of(shard)``,
                                 learnt over the group at join: ``set_addresses``)

Why the model worker keeps the bookkeeping and the attention worker only the receiver: the
engine decides placement, reservation, admission and freeing (its blocks are the shards'
pages), and the request's stream, deadline and first token are already the DecodeWorker's;
the attention worker only has to get the bytes into the right pages and say when they are
all there. The control messages ride the same ordered channel as the steps, so a CANCEL
always precedes the EXPECT (or step) of the blocks' next owner.

Threading: called from the model worker's loop thread only, between steps (the group's
messages are ordered by that thread); ``close`` after the loop stopped. No ``on_terminal``
wake-up: a shard's receiver cannot signal across the group, so a finished transfer is seen
at the loop's next tick (a step, or ``idle_poll_s`` when idle).
"""

from __future__ import annotations

from typing import Any

from attention_offload.dist_transport import DistAttentionTransport
from attention_offload.remote import RemoteAttentionBackend
from attention_offload.shard_kv import TRANSFER_STATES
from engine.kv_cache.layout import KVLayout
from kv_transfer.base import KVReceiver, TransferStatus


class AttentionKVReceiver(KVReceiver):
    """``backend`` maps engine block ids to (shard, pages); ``transport`` carries the control
    messages. Not a page receiver itself: ``cache`` is None and ``bytes_received`` 0."""

    def __init__(self, layout: KVLayout, backend: RemoteAttentionBackend, transport: DistAttentionTransport):
        # no KVReceiver.__init__: there is no local cache to check the layout against (the
        # shards' receivers check the prefill worker's layout at its handshake)
        self.layout, self.cache = layout, None
        self.on_terminal = None  # never called (module docstring)
        self.backend, self.transport = backend, transport
        self._addresses: list[Any] | None = None  # per shard, once joined
        self._shard: dict[str, int] = {}  # expected requests -> their shard
        self._errors: dict[str, str] = {}  # FAILED requests -> why (from the last poll)
        self.polls = 0  # POLL round trips (metrics, tests)

    # ------------------------------------------------------------ addresses
    def set_addresses(self, addresses: list[Any]) -> None:
        if len(addresses) != self.transport.num_shards:
            raise ValueError(f"{len(addresses)} KV addresses for {self.transport.num_shards} attention workers")
        self._addresses = list(addresses)

    def check_ready(self) -> None:
        """Raises RuntimeError, naming why, unless every attention worker's address is known."""
        if self._addresses is None:
            raise RuntimeError("the attention workers' KV addresses are not known yet (the group has not formed)")
        missing = [s + 1 for s, a in enumerate(self._addresses) if a is None]
        if missing:
            raise RuntimeError(
                f"attention workers (ranks {missing}) have no KV receiver (built without a transfer kind)"
            )

    def address_of(self, shard: int) -> Any:
        """Where a prefill worker sends the KV of a request placed on ``shard``."""
        self.check_ready()
        assert self._addresses is not None
        return self._addresses[shard]

    @property
    def address(self) -> Any:
        return None  # per request: DecodeAPI.start_transfer returns it

    # ------------------------------------------------------------ KVReceiver
    def expect(self, request_id: str, block_ids: list[int]) -> None:
        if request_id in self._shard:
            raise ValueError(f"request {request_id!r} is already expected; cancel() it first")
        shard, pages = self.backend.shard_pages(request_id, list(block_ids))
        self.transport.kv_expect(shard, request_id, pages)
        self._shard[request_id] = shard

    def poll_many(self, request_ids: list[str]) -> dict[str, TransferStatus]:
        by_shard: dict[int, list[str]] = {}
        for rid in request_ids:
            shard = self._shard.get(rid)
            if shard is None:
                raise KeyError(f"request {rid!r} is not expected by this receiver")
            by_shard.setdefault(shard, []).append(rid)
        out: dict[str, TransferStatus] = {}
        for shard, rids in by_shard.items():
            self.polls += 1
            for rid, (code, why) in zip(rids, self.transport.kv_poll(shard, rids), strict=True):
                out[rid] = TransferStatus(TRANSFER_STATES[code])
                if why is not None:
                    self._errors[rid] = why
        return out

    def poll(self, request_id: str) -> TransferStatus:
        return self.poll_many([request_id])[request_id]

    def error(self, request_id: str) -> str | None:
        return self._errors.get(request_id)

    def cancel(self, request_id: str) -> None:
        self._errors.pop(request_id, None)
        shard = self._shard.pop(request_id, None)
        if shard is not None:
            self.transport.kv_cancel(shard, request_id)

    def close(self) -> None:
        """Nothing to release here: each attention worker closes its own receiver."""
