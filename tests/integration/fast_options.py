"""Controller options for the Ray integration tests: health checks and restarts fast enough
that a killed worker is noticed within a second and replaced soon after."""

from __future__ import annotations

import dataclasses

from cluster.control.controller import ControllerOptions

FAST = ControllerOptions(health_interval_s=0.2, ping_timeout_s=10.0, restart_backoff_s=0.5, read_timeout_s=0.5)
# with worker groups (EP, attention offload, TP): a dead member fails its group's collectives in 5 s
FAST_GROUPS = dataclasses.replace(FAST, ep_group_timeout_s=5.0)
