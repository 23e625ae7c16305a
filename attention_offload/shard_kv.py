"""ShardKV: an attention worker's KV receiver, driven by its model worker between steps.

Prefill workers push a request's prompt KV straight into the attention worker that will hold
it (no detour through the model worker): each attention worker owns a KV receiver
(kv_transfer's, handed in as a factory: attention_offload does not import its sibling
package) writing into its shard's PagedKVCache, so the pages land where attention reads them.
Its page ids are the model worker's engine block ids of that shard's sub-pool (shard.py), so
the receiver's destination blocks are exactly the blocks the engine reserved.

Who decides what: the model worker keeps every piece of a transferred request's bookkeeping
(decode_worker/worker.py: reservation, deadline, first token, admission, abort); this class
only applies its decisions to the receiver, in the group's message order
(dist_transport.py's control messages, sent between steps):

    EXPECT(rid, pages)   receiver.expect; a refusal (duplicate id, page out of range, no
                         receiver) is kept and reported by the next POLL as "failed"
                         (fire-and-forget: no round trip per request)
    POLL(rids)           per request: its state's wire code (TRANSFER_STATES) and, when
                         failed, why
    CANCEL(rid)          receiver.cancel (a finished, failed or aborted transfer is forgotten;
                         fire-and-forget too: a chunk that lands before the serve loop applied
                         it may still be written into the request's blocks, which is harmless:
                         their next owner's EXPECT or step comes later on the same ordered
                         channel, so after the CANCEL (the receiver's lock orders the write
                         before it), and writes its slots before reading them (shard.py); a
                         chunk after it is dropped unwritten)
    ADDRESS              the receiver's address (what prefill workers connect to), once, when
                         the model worker joins the group

Thread safety: the serve loop thread calls these; the receiver's transport threads write pages
concurrently (kv_transfer's ReceiverBook locks its state).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache

# kv_transfer.TransferStatus values by wire code (a test checks they match)
TRANSFER_STATES = ("bootstrapping", "transferring", "done", "failed")
FAILED_CODE = TRANSFER_STATES.index("failed")


class ShardKVReceiver(Protocol):
    """The part of kv_transfer.KVReceiver an attention worker uses."""

    @property
    def address(self) -> Any: ...

    @property
    def bytes_received(self) -> int: ...

    def expect(self, request_id: str, block_ids: list[int]) -> None: ...

    def poll(self, request_id: str) -> Any: ...  # an enum whose .value is one of TRANSFER_STATES

    def cancel(self, request_id: str) -> None: ...

    def error(self, request_id: str) -> str | None: ...

    def close(self) -> None: ...


# (the shard's KV layout, its cache, this node's address) -> a listening receiver
# (kv_transfer.ReceiverFactory)
ShardReceiverFactory = Callable[[KVLayout, PagedKVCache, "str | None"], ShardKVReceiver]


class ShardKV:
    """The serve loop's side of one shard's receiver (None: the worker was built without one;
    every EXPECT then fails, named)."""

    def __init__(self, receiver: ShardKVReceiver | None, worker_id: str = "attention"):
        self.receiver, self.worker_id = receiver, worker_id
        self._refused: dict[str, str] = {}  # rid -> why its EXPECT was refused (until CANCEL)
        self.expected = 0  # EXPECTs applied (metrics, tests)

    @property
    def address(self) -> Any:
        return None if self.receiver is None else self.receiver.address

    @property
    def bytes_received(self) -> int:
        return 0 if self.receiver is None else self.receiver.bytes_received

    def expect(self, request_id: str, pages: list[int]) -> None:
        if self.receiver is None:
            self._refused[request_id] = f"{self.worker_id} has no KV receiver (built without a transfer kind)"
            return
        try:
            self.receiver.expect(request_id, pages)
        except (ValueError, RuntimeError) as e:  # the request fails, not the shard's loop
            self._refused[request_id] = f"{self.worker_id} refused the transfer: {type(e).__name__}: {e}"
            return
        self.expected += 1

    def status(self, request_id: str) -> tuple[int, str | None]:
        """(wire code, why it failed or None)."""
        why = self._refused.get(request_id)
        if why is not None:
            return FAILED_CODE, why
        if self.receiver is None:
            return FAILED_CODE, f"{self.worker_id} has no KV receiver"
        try:
            state = self.receiver.poll(request_id).value
        except KeyError:
            return FAILED_CODE, f"request {request_id!r} is not expected by {self.worker_id}"
        code = TRANSFER_STATES.index(state)
        return code, self.receiver.error(request_id) if code == FAILED_CODE else None

    def cancel(self, request_id: str) -> None:
        self._refused.pop(request_id, None)
        if self.receiver is not None:
            self.receiver.cancel(request_id)

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
