"""The options each worker of an expert-parallel pool (``PoolConfig.experts`` > 1) is built
with: the pool's files read once by the control plane (the placement's JSON text, the routing
log's bytes: actors may run on nodes without the files), and the worker's rank = its index in
the pool (``<pool>-<i>`` is rank i, and a replacement keeps it)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import PoolConfig
from expert_router.group import EPRankOptions


@dataclass(frozen=True)
class EPPoolFiles:
    placement_json: str | None  # the pool's expert_placement file's text; None: contiguous
    routing_log: bytes | None  # the pool's expert_routing_log file's bytes; None: none given


def read_ep_files(pool: PoolConfig, index: int) -> EPPoolFiles:
    """The files of ``pool`` (``pools[index]`` of the config); raises ValueError naming the
    field of a file that cannot be read."""
    placement = None
    if pool.expert_placement is not None:
        placement = _read(pool.expert_placement, f"pools[{index}].expert_placement").decode("utf-8")
    log = (
        None
        if pool.expert_routing_log is None
        else _read(pool.expert_routing_log, f"pools[{index}].expert_routing_log")
    )
    return EPPoolFiles(placement, log)


def ep_rank_options(pool: PoolConfig, worker_id: str, files: EPPoolFiles | None) -> EPRankOptions | None:
    """What worker ``worker_id`` of ``pool`` is built with (``files``: ``read_ep_files`` of the
    pool); None for a pool without EP."""
    if pool.experts <= 1:
        return None
    if files is None:
        raise ValueError(f"pool {pool.name!r} is expert-parallel: its files must be read first (read_ep_files)")
    rank = int(worker_id.rsplit("-", 1)[1])
    return EPRankOptions(pool.experts, rank, files.placement_json, pool.expert_cache_slots, files.routing_log)


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{field}: cannot read {path!r}: {e}") from None
