"""Discrete-event simulator of a Splitwise-style cluster, calibrated by profiled step times.

model.py      ProfileTable (JSON from ``splitserve profile``) -> StepTimeModel
workload.py   Azure trace excerpts, Poisson resampling, fixed workloads
simulator.py  SimConfig, LinkConfig, Simulator (event loop, routing, KV transfer)
instance.py   one engine instance: continuous batching, chunked prefill, KV blocks
request.py    SimRequest (per-request state and timestamps)
snapshot.py   O(log n) load snapshots so RoutingPolicy scales to thousands of instances
metrics.py    SimResult: TTFT/TPOT/ITL/E2E percentiles, SLO attainment, goodput
planner.py    sweep_ratio: the best prefill:decode split for a target rate and SLOs
roofline.py   illustrative step-time tables for hardware we cannot profile
command.py    ``splitserve sim``
"""

from cluster.tools.sim.metrics import SimResult
from cluster.tools.sim.model import ProfileTable, StepTimeModel
from cluster.tools.sim.simulator import LinkConfig, SimConfig, Simulator
from cluster.tools.sim.workload import Workload, load_trace, poisson

__all__ = [
    "LinkConfig",
    "ProfileTable",
    "SimConfig",
    "SimResult",
    "Simulator",
    "StepTimeModel",
    "Workload",
    "load_trace",
    "poisson",
]
