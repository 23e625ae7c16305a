"""Building one rank of an expert-parallel group around an EngineCore (no Ray, no group
creation: the caller joined the group and passes its communicator)."""

from __future__ import annotations

from engine.config import EngineConfig, ModelConfig
from engine.engine import EngineCore
from engine.parallel import Communicator
from expert_router.dispatcher import EPDispatcher
from expert_router.expertflow import ExpertCacheConfig
from expert_router.placement import ExpertPlacement, moe_layers


def contiguous_placement(cfg: ModelConfig, world_size: int) -> ExpertPlacement:
    return ExpertPlacement.contiguous(cfg.moe.num_experts if cfg.moe else 0, world_size, moe_layers(cfg))


def build_ep_engine(
    config: EngineConfig,
    comm: Communicator | None,
    placement: ExpertPlacement | None = None,
    cache: ExpertCacheConfig | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[EngineCore, EPDispatcher]:
    """This rank's engine: attention, dense layers, gates and shared experts replicated, the
    routed experts of ``placement`` (contiguous by default) loaded for this rank only;
    ``cache``: run them through an ExpertFlow fast tier (expert_router/expertflow.py).
    ``comm=None``: build for ``rank`` of ``world_size`` before the group forms; the caller
    ``dispatcher.connect(comm)``s before the first step."""
    mc = config.model
    if comm is not None:
        rank, world_size = comm.rank, comm.world_size
    elif rank is None or world_size is None:
        raise ValueError("build_ep_engine needs a communicator, or rank and world_size")
    placement = placement or contiguous_placement(mc, world_size)
    if sorted(placement.layers) != moe_layers(mc):
        raise ValueError(f"placement covers layers {placement.layers}, the model's MoE layers are {moe_layers(mc)}")
    assert mc.moe is not None
    dispatcher = EPDispatcher(comm, placement, mc.moe.top_k, cache, rank=rank)
    return EngineCore(config, dispatcher=dispatcher), dispatcher
