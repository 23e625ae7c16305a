"""Fabricated reports for tests that need a WorkerStats / WorkerLimits without a worker.

The production types have no defaults (a worker must report every field); tests state only
what they are about and take these neutral values for the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.types import EngineStats, HistogramReport, WorkerLimits, WorkerStats

EMPTY_HISTOGRAM = HistogramReport(bounds=(0.1, 1.0), counts=(0, 0), sum=0.0, count=0)


def engine_stats(**overrides: Any) -> EngineStats:
    base = EngineStats(
        running_requests=0,
        waiting_requests=0,
        free_kv_blocks=100,
        total_kv_blocks=100,
        pending_prompt_tokens=0,
        preemptions=0,
        prefix_cache_hits=0,
        prefix_cache_queries=0,
    )
    return dataclasses.replace(base, **overrides)


def worker_stats(worker_id: str = "decode-0", role: str = "decode", **overrides: Any) -> WorkerStats:
    """``engine=`` takes an EngineStats or a dict of EngineStats overrides."""
    engine = overrides.pop("engine", {})
    base = WorkerStats(
        worker_id=worker_id,
        role=role,
        started_at=1000.0,
        stale=False,
        engine=engine if isinstance(engine, EngineStats) else engine_stats(**engine),
        pending_requests=0,
        transfers_in_flight=0,
        transfer_failures=0,
        transfer_bytes=0 if role == "prefill" else None,
        transfer_seconds=EMPTY_HISTOGRAM if role == "prefill" else None,
        queue_seconds=EMPTY_HISTOGRAM,
        reserve_wait_seconds=None if role == "prefill" else EMPTY_HISTOGRAM,
        handoff_seconds=None if role == "prefill" else EMPTY_HISTOGRAM,
        speculation=None,
        cached_block_hashes=frozenset(),
    )
    return dataclasses.replace(base, **overrides)


def worker_limits(**overrides: Any) -> WorkerLimits:
    base = WorkerLimits(
        max_model_len=2048,
        vocab_size=1000,
        block_size=16,
        num_kv_blocks=1024,
        max_num_batched_tokens=2048,
        chunked_prefill=True,
    )
    return dataclasses.replace(base, **overrides)
