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


class EPSetupError(ValueError):
    """An EP pool's settings do not fit its model; ``field`` names the pool setting."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def serving_placement(
    cfg: ModelConfig, experts: int, placement_json: str | None = None, cache_slots: int | None = None
) -> tuple[ExpertPlacement, ExpertCacheConfig | None]:
    """The placement and fast-tier config of a served EP group of ``experts`` ranks, checked
    against the model: an MoE model whose routed expert count ``experts`` divides (so every
    rank holds the same share), a placement (JSON text of ``ExpertPlacement``; None:
    contiguous) over exactly the model's MoE layers and ``experts`` ranks, and
    ``cache_slots`` (LRU fast tier) within the per-rank share. Raises EPSetupError naming the
    pool field (``experts``, ``expert_placement``, ``expert_cache_slots``)."""
    if cfg.moe is None:
        raise EPSetupError("experts", f"{cfg.architecture} is a dense model: expert parallelism needs an MoE model")
    n = cfg.moe.num_experts
    if experts < 2 or n % experts:
        raise EPSetupError("experts", f"must be >= 2 and divide the model's {n} routed experts, got {experts}")
    if placement_json is None:
        placement = contiguous_placement(cfg, experts)
    else:
        try:
            placement = ExpertPlacement.from_json(placement_json)
        except (ValueError, KeyError, TypeError) as e:
            raise EPSetupError("expert_placement", f"not an ExpertPlacement JSON: {e}") from None
        if placement.world_size != experts:
            raise EPSetupError("expert_placement", f"places over {placement.world_size} ranks, experts is {experts}")
        if placement.layers != moe_layers(cfg):
            raise EPSetupError(
                "expert_placement", f"covers layers {placement.layers}, the model's MoE layers are {moe_layers(cfg)}"
            )
        if any(placement.num_experts(layer) != n for layer in placement.layers):
            raise EPSetupError("expert_placement", f"does not place the model's {n} experts in every layer")
    cache = None
    if cache_slots is not None:
        share = n // experts
        if not 1 <= cache_slots <= share:
            raise EPSetupError("expert_cache_slots", f"must be in [1, {share}] (experts per rank), got {cache_slots}")
        cache = ExpertCacheConfig(cache_slots, policy="lru")  # no routing log in serving: no predictor
    return placement, cache


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
