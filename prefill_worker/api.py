"""PrefillAPI: what the control plane calls on a prefill worker (see engine.runtime.api).

``emitted`` (failover): tokens the request already generated on a worker that failed; they
are prefilled after the prompt and count as output (see decode_worker.api). A worker holds
at most its ``max_pending`` requests; one more is refused with ``queue.Full``."""

from __future__ import annotations

import abc

from engine.runtime.api import GroupMemberAPI, WorkerAPI
from engine.types import KVAddress, RequestSpec, StreamChunk


class PrefillAPI(WorkerAPI, GroupMemberAPI):
    """``join_group`` (GroupMemberAPI): rank 0's tensor-parallel group ``tp/<worker id>``
    (ValueError on a worker that is not rank 0 of a TP worker)."""

    @abc.abstractmethod
    def prefill(
        self, spec: RequestSpec, decode_address: KVAddress, timeout: float | None = None, emitted: tuple[int, ...] = ()
    ) -> StreamChunk:
        """Compute the prompt (and ``emitted``) and stream its KV to the decode worker
        listening at ``decode_address``; returns once the next token is sampled (a chunk with
        that one token, or a finished chunk if the request ended or failed). The KV may still
        be in flight: the decode worker's own transfer poll says when it has landed."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Cancel the request here (queued, prefilling, or its transfer settling); frees its blocks."""
