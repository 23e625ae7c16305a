"""Suite-wide pytest hooks and fixtures.

- Tests marked ``gpu`` are skipped, with a reason, when ``torch.cuda.is_available()`` is false.
- ``tiny_checkpoint(family="llama", **kwargs) -> str`` builds a random-weight checkpoint
  directory once per session per distinct argument set (see engine/models/tiny.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

# Triton kernels run in the interpreter on machines without CUDA. TRITON_INTERPRET is read
# when a kernel is decorated, i.e. at first import, so it must be set before any test imports
# engine.attention.triton_paged.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only paid for when gpu tests were collected

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Factory: ``tiny_checkpoint("qwen3", num_key_value_heads=1)`` -> checkpoint directory.

    Arguments are those of ``engine.models.tiny.build_tiny_checkpoint`` minus ``out_dir``.
    Each distinct argument set is built once per session; treat the directory as read-only.
    """
    from engine.models.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")

    def build(family: str = "llama", **kwargs: Any) -> str:
        key = json.dumps({"family": family, **kwargs}, sort_keys=True, default=str)
        name = f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        return build_tiny_checkpoint(root / name, family=family, **kwargs)

    return build


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny test models run one torch thread: on a small shared CPU box, intra-op threads that
    spin-wait for a core another process holds made suites ~10x slower (23 s with one thread,
    300 s with two, for tests/correctness under load); the ops are far too small to gain."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _fresh_worker_stats():
    """In-process workers answer ``stats()`` fresh, never with the stale after-step report:
    tests assert exact counts (pending requests, free blocks) right after a call, and on a
    loaded machine a step can outlast the serving default (engine/runtime/worker.py)."""
    import engine.runtime.worker as worker

    before = worker.STATS_WAIT_S
    worker.STATS_WAIT_S = 60.0
    yield
    worker.STATS_WAIT_S = before
