"""Building one rank of an expert-parallel group around an EngineCore (no Ray, no group
creation: the caller joined the group and passes its communicator)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import EngineConfig, ModelConfig
from engine.engine import EngineCore
from engine.parallel import Communicator
from expert_router.dispatcher import EPDispatcher
from expert_router.expertflow import ExpertCacheConfig, PathPredictor
from expert_router.placement import ExpertPlacement, moe_layers
from expert_router.routing_log import RoutingLog
from expert_router.token_prior import TokenPrior


def contiguous_placement(cfg: ModelConfig, world_size: int) -> ExpertPlacement:
    return ExpertPlacement.contiguous(cfg.moe.num_experts if cfg.moe else 0, world_size, moe_layers(cfg))


class EPSetupError(ValueError):
    """An EP pool's settings do not fit its model; ``field`` names the pool setting."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class EPRankOptions:
    """One served EP rank's settings, as the control plane hands them to a worker (plain
    values: they cross Ray to actors that may be on other nodes, so files travel as contents).

    ``experts``: the group's size (>= 2); ``rank``: this worker's rank (its index in its pool,
    which a replacement keeps); ``placement_json``: an ExpertPlacement's JSON text (None:
    contiguous); ``cache_slots``: the ExpertFlow fast tier's experts per MoE layer (None: the
    whole share resident); ``routing_log``: the routing log's .npz bytes (the fast tier's
    predictor; read only with ``cache_slots``)."""

    experts: int
    rank: int
    placement_json: str | None = None
    cache_slots: int | None = None
    routing_log: bytes | None = None


def build_serving_ep_engine(config: EngineConfig, opts: EPRankOptions) -> tuple[EngineCore, EPDispatcher]:
    """This served rank's engine and dispatcher (not connected: the worker's ``join_group``
    connects it). Raises EPSetupError naming the pool field when the settings do not fit the
    model."""
    log = None
    if opts.routing_log is not None and opts.cache_slots is not None:  # only the cache reads it
        try:
            log = RoutingLog.load(opts.routing_log)
        except (ValueError, KeyError, OSError) as e:
            raise EPSetupError("expert_routing_log", f"not a routing log: {e}") from None
    placement, cache = serving_placement(config.model, opts.experts, opts.placement_json, opts.cache_slots, log)
    return build_ep_engine(config, None, placement, cache, rank=opts.rank, world_size=opts.experts)


def serving_placement(
    cfg: ModelConfig,
    experts: int,
    placement_json: str | None = None,
    cache_slots: int | None = None,
    routing_log: RoutingLog | None = None,
) -> tuple[ExpertPlacement, ExpertCacheConfig | None]:
    """The placement and fast-tier config of a served EP group of ``experts`` ranks, checked
    against the model: an MoE model whose routed expert count ``experts`` divides (so every
    rank holds the same share), a placement (JSON text of ``ExpertPlacement``; None:
    contiguous) over exactly the model's MoE layers and ``experts`` ranks, and
    ``cache_slots`` within the per-rank share: an LRU fast tier, or with a ``routing_log``
    (the pool's ``expert_routing_log``, checked by ``check_routing_log``) ExpertFlow's policy
    with the path predictor fitted on it (prefetch, replacement by predicted use). Raises
    EPSetupError naming the pool field (``experts``, ``expert_placement``,
    ``expert_cache_slots``, ``expert_routing_log``)."""
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
        if list(placement.layers) != moe_layers(cfg):
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
        if routing_log is None:
            cache = ExpertCacheConfig(cache_slots, policy="lru")  # no routing log: no predictor
        else:
            check_routing_log(cfg, routing_log, "the routing log")
            cache = ExpertCacheConfig(cache_slots, policy="expertflow", predictor=PathPredictor(routing_log))
    return placement, cache


def check_routing_log(cfg: ModelConfig, log: RoutingLog, name: str) -> None:
    """Raises EPSetupError (``expert_routing_log``) unless ``log`` was recorded on a model
    like ``cfg``: the same MoE layers, routed expert count and top-k."""
    if cfg.moe is None:
        raise EPSetupError("experts", f"{cfg.architecture} is a dense model: expert parallelism needs an MoE model")
    n = cfg.moe.num_experts
    if log.num_experts != n:
        raise EPSetupError("expert_routing_log", f"{name} logs {log.num_experts} experts, the model has {n}")
    if list(log.layers) != moe_layers(cfg):
        raise EPSetupError(
            "expert_routing_log", f"{name} logs layers {log.layers}, the model's MoE layers are {moe_layers(cfg)}"
        )
    if log.top_k != cfg.moe.top_k:
        raise EPSetupError("expert_routing_log", f"{name} logs top-{log.top_k}, the model routes top-{cfg.moe.top_k}")


def serving_token_prior(cfg: ModelConfig, log_path: str) -> TokenPrior:
    """The s-TS token prior of an EP pool's ``expert_routing_log``, checked against the model:
    a routing log (expert_router/routing_log.py) with token ids, over the model's MoE layers
    and routed expert count. Raises EPSetupError naming ``expert_routing_log``."""
    try:
        log = RoutingLog.load(log_path)
    except (OSError, ValueError, KeyError) as e:
        raise EPSetupError("expert_routing_log", f"cannot read {log_path!r}: {e}") from None
    check_routing_log(cfg, log, repr(log_path))
    try:
        return TokenPrior.fit(log)
    except ValueError as e:
        raise EPSetupError("expert_routing_log", str(e)) from None


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
