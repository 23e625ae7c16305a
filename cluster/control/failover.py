"""Failover bookkeeping: why a placement of a request failed, and what the router counts.

One mechanism for every worker kind. A request's placement (an ``Attempt``) depends on a set
of workers (today: a prefill worker until its first token, and a decode worker; attention and
expert workers join the set when they exist). The placement fails when

- a call to one of them raises ``WorkerUnavailable`` (the actor died, its engine loop
  stopped), or the controller declares one of them lost (``Router.worker_lost``: dead or
  hung, replaced) while the request waits on it;
- the decode worker ends the request's stream with an error (its KV transfer failed, e.g. a
  checksum mismatch or the prefill worker dying mid-transfer, or timed out);
- a worker refuses it at its bound (``queue.Full``).

The router then places the request again (``FailoverConfig.max_retries`` times at most),
re-prefilling the prompt plus every token emitted so far on the new placement, and the
client's stream continues at its cursor. A new worker kind plugs in by raising
``WorkerUnavailable`` from its handle, by failing the decode stream with an error, or by being
named to ``worker_lost``; it needs no failover code of its own.

``FailureCause`` values label the metrics (``splitserve_request_failovers_total{cause}``).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

from decode_worker.api import KV_TRANSFER_FAILED, KV_TRANSFER_TIMED_OUT
from engine.runtime.stats import CumulativeHistogram

# Seconds from a placement's failure to the request's next token (its recovery).
RECOVERY_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class FailureCause(str, enum.Enum):
    WORKER_LOST = "worker_lost"  # a worker of the placement died, hung, or its engine stopped
    KV_CHECKSUM = "kv_checksum"  # the KV arrived corrupted: retried with a fresh transfer
    KV_TRANSFER = "kv_transfer"  # the KV transfer failed otherwise (link broke, timed out)
    WORKER_FULL = "worker_full"  # a worker refused the request at its bound (queue.Full)
    STREAM_FAILED = "stream_failed"  # the worker ended the stream with another error, or lost it


class AttemptFailed(Exception):
    """One placement of a request failed for ``cause``; the router may place it again."""

    def __init__(self, cause: FailureCause, worker_id: str, message: str):
        super().__init__(f"{cause.value} on {worker_id}: {message}")
        self.cause = cause
        self.worker_id = worker_id
        self.message = message


def classify_stream_error(error: str) -> FailureCause:
    """The cause of a stream a decode worker ended with ``error`` (decode_worker/worker.py
    writes KV_TRANSFER_FAILED / KV_TRANSFER_TIMED_OUT; kv_transfer's receiver names a
    checksum mismatch; a crashed engine loop fails every stream with "engine failed")."""
    if error.startswith(KV_TRANSFER_FAILED):
        return FailureCause.KV_CHECKSUM if "checksum" in error else FailureCause.KV_TRANSFER
    if error.startswith(KV_TRANSFER_TIMED_OUT):
        return FailureCause.KV_TRANSFER
    if "engine failed" in error or "unavailable" in error:
        return FailureCause.WORKER_LOST
    return FailureCause.STREAM_FAILED


@dataclass
class FailoverStats:
    """What the router counts (exported by cluster/metrics/reliability.py). Written on the
    router's event loop, read by the metrics scrape thread: counters only grow, and the lock
    guards the histogram's multi-field update."""

    failovers: dict[str, int] = field(default_factory=lambda: {c.value: 0 for c in FailureCause})
    exhausted: dict[str, int] = field(default_factory=lambda: {c.value: 0 for c in FailureCause})
    waits: int = 0  # failed-over requests that had to wait for a worker to come back
    waiting: int = 0  # ... waiting now
    resumed: dict[str, int] = field(default_factory=lambda: {"live": 0, "replayed": 0, "continued": 0})
    recovery_seconds: CumulativeHistogram = field(default_factory=lambda: CumulativeHistogram(RECOVERY_SECONDS_BUCKETS))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def failover(self, cause: FailureCause) -> None:
        self.failovers[cause.value] += 1

    def gave_up(self, cause: FailureCause) -> None:
        self.exhausted[cause.value] += 1

    def recovered(self, seconds: float) -> None:
        with self._lock:
            self.recovery_seconds.observe(seconds)

    def recovery_report(self):
        with self._lock:
            return self.recovery_seconds.report()
