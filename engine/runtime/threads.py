"""Intra-op thread count of a worker process from its CPU share (a Ray actor's ``num_cpus``)."""

from __future__ import annotations

import torch


def set_threads_for_cpu_share(cpus: float) -> int:
    """``torch.set_num_threads`` to ``cpus`` rounded down, at least 1; returns the count."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n
