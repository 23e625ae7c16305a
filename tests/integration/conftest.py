"""Fixtures shared by the Ray integration tests."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of this test module's own (2 CPUs), shut down after the module."""
    if ray.is_initialized():  # a connection another module left behind would block ray.init
        ray.shutdown()
    # address="local": our own instance, even when another Ray instance runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
