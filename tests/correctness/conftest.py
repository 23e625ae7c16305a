"""Correctness-suite fixtures.

The tiny models run one torch thread: on a small shared CPU box, intra-op threads that
spin-wait for a core another process holds made this suite ~10x slower (measured: 23 s with
one thread, 300 s with two under load), and the ops are far too small to gain from them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
