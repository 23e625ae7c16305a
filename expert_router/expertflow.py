"""ExpertFlow: a per-layer fast-tier expert cache over a slow tier, with a routing-path
predictor that prefetches experts for upcoming layers and steps.

What the tiers model here (CPU only, no GPU lent): the FAST tier is the device's expert
memory, ``expert_cache_slots`` experts per MoE layer; the SLOW tier is host memory behind a
bandwidth-limited link (PCIe): every expert the fast tier loads is really copied into a slot
tensor, and its cost is accounted as bytes / ``bandwidth_gbps`` (modelled seconds; the copy
on this machine is a memcpy between two host buffers and is not what is measured).

- ``PathPredictor`` is fitted on a routing log (expert_router/routing_log.py): first-order
  transitions between consecutive MoE layers (P(e' at layer l+1 | e at layer l)), between
  consecutive tokens at the first MoE layer (the next step), and per-layer popularity.
- ``ExpertCacheCore`` is the policy, without tensors (the simulator and the dispatcher share
  it): on each layer's gate output it serves the needed experts (hit, or a demand load that
  evicts), then, with a predictor, prefetches the experts predicted for the next layer (or
  the next step's first layer after the last). Replacement:
    lru         least recently used
    lfu         least frequently used (recency breaks ties)
    expertflow  lowest predicted future use: the latest prediction for that layer, made from
                the gate's REAL choices one layer earlier, corrected when the layer's own gate
                speaks (predicted-but-unchosen experts halve, chosen ones gain one expected
                use), popularity breaking ties
- ``ExpertFlowDispatcher`` runs every expert from the fast tier only: a miss loads the expert
  first, so a miss never changes an output, it only costs a load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.models.moe import LocalExperts
from expert_router.routing_log import RoutingLog

POLICIES = ("lru", "lfu", "expertflow")


class PathPredictor:
    """Routing-path statistics of a log. Scores are expected uses per token (higher = sooner)."""

    def __init__(self, log: RoutingLog, smoothing: float = 0.1):
        e, nl = log.num_experts, len(log.layers)
        self.layers = log.layers
        self.num_experts = e
        ids = log.ids.astype(np.int64)  # [N, L, k]
        self.popularity = np.stack([np.bincount(ids[:, li].reshape(-1), minlength=e) for li in range(nl)]).astype(
            np.float64
        )
        self.popularity = (self.popularity + smoothing) / (self.popularity + smoothing).sum(axis=1, keepdims=True)
        # next_layer[li][a, b]: P(b chosen at layer li + 1 | a chosen at layer li)
        self.next_layer = [self._transitions(ids[:, li], ids[:, li + 1], smoothing) for li in range(nl - 1)]
        # next_step[a, b]: P(b at the first MoE layer of token t + 1 | a there at token t)
        prev, nxt = [], []
        for s in range(log.num_sequences):
            a, b = log.seq_offsets[s], log.seq_offsets[s + 1]
            if b - a > 1:
                prev.append(ids[a : b - 1, 0])
                nxt.append(ids[a + 1 : b, 0])
        k = log.top_k
        self.next_step = self._transitions(
            np.concatenate(prev) if prev else np.zeros((0, k), np.int64),
            np.concatenate(nxt) if nxt else np.zeros((0, k), np.int64),
            smoothing,
        )

    def _transitions(self, a: np.ndarray, b: np.ndarray, smoothing: float) -> np.ndarray:
        e = self.num_experts
        t = np.full((e, e), smoothing / e)
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                np.add.at(t, (a[:, i], b[:, j]), 1.0)
        return t / t.sum(axis=1, keepdims=True)

    def predict(self, layer_index: int, ids: np.ndarray) -> tuple[int, np.ndarray]:
        """From the experts the gate really chose at MoE layer index ``layer_index`` (``ids``:
        any shape, one entry per (token, choice)) -> (the layer index predicted, expected
        uses per expert [E] summed over them): the next layer, or after the last one the next
        step's first layer."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if layer_index + 1 < len(self.layers):
            return layer_index + 1, self.next_layer[layer_index][ids].sum(axis=0)
        return 0, self.next_step[ids].sum(axis=0) if ids.size else np.zeros(self.num_experts)


@dataclass
class CacheStats:
    hits: int = 0  # needed experts already in the fast tier
    misses: int = 0  # needed experts loaded on demand (the forward waits for these)
    prefetches: int = 0  # experts loaded ahead of need
    prefetch_used: int = 0  # of those, later hit before being evicted
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetches if self.prefetches else 0.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches


# (layer index, expert, slot) -> None: copy the expert into that fast-tier slot
LoadFn = Callable[[int, int, int], None]


@dataclass
class _LayerState:
    slot_of: dict[int, int] = field(default_factory=dict)  # cached expert -> slot
    free: list[int] = field(default_factory=list)
    last_use: dict[int, int] = field(default_factory=dict)
    uses: dict[int, int] = field(default_factory=dict)
    prefetched: set[int] = field(default_factory=set)  # loaded ahead, not yet hit
    score: np.ndarray | None = None  # latest predicted future use per expert


class ExpertCacheCore:
    """Which experts each MoE layer's fast tier holds; see the module docstring.
    Layers are MoE layer indices 0..L-1 (positions in the routing log's ``layers``)."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        slots: int,
        policy: str,
        predictor: PathPredictor | None = None,
        load: LoadFn | None = None,
        prefetch_width: int | None = None,
        allowed: Sequence[set[int]] | None = None,
    ):
        """``prefetch_width``: experts prefetched per prediction; None = as many as the layer
        just needed (the predicted layer likely needs about as many). ``allowed``: per layer,
        the experts this process may load (an EP rank's share); None = all."""
        if policy not in POLICIES:
            raise ValueError(f"ExpertFlow policy must be one of {POLICIES}, got {policy!r}")
        if not 1 <= slots <= num_experts:
            raise ValueError(f"expert_cache_slots must be in [1, {num_experts}], got {slots}")
        if policy == "expertflow" and predictor is None:
            raise ValueError("the expertflow policy needs a PathPredictor (fitted on a routing log)")
        self.num_experts, self.slots, self.policy, self.predictor = num_experts, slots, policy, predictor
        self.layers = [_LayerState(free=list(range(slots))) for _ in range(num_layers)]
        self.load = load or (lambda layer, e, slot: None)
        self.prefetch_width = prefetch_width
        self.allowed = None if allowed is None else [np.array(sorted(a), dtype=np.int64) for a in allowed]
        self.clock = 0
        self.stats = CacheStats()

    def access(self, li: int, ids: np.ndarray, run: Callable[[int, int], None] | None = None) -> None:
        """The gate chose ``ids`` [n, k] at MoE layer index li. Each needed expert, in
        ascending id, is made resident (a hit, or a demand load evicting another) and then
        ``run(expert, slot)`` is called while it is; a batch needing more experts than slots
        goes through in waves (an evicted one reloads if needed again). Then, with a
        predictor, prefetches what the gate's real choices predict for what comes next."""
        st, s = self.layers[li], self.stats
        ids = np.asarray(ids).reshape(-1)
        ids = ids[ids >= 0]  # -1: a choice another EP rank runs
        needed = sorted({int(x) for x in ids})
        self.clock += 1
        for i, e in enumerate(needed):
            if e in st.slot_of:
                s.hits += 1
                if e in st.prefetched:
                    st.prefetched.discard(e)
                    s.prefetch_used += 1
            else:
                s.misses += 1
                self._insert(li, e, set(needed), set(needed[i:]))
            st.last_use[e] = self.clock
            st.uses[e] = st.uses.get(e, 0) + 1
            if run is not None:
                run(e, st.slot_of[e])
        if st.score is not None:
            # the gate has spoken: what it chose outranks what was predicted and not chosen
            st.score = st.score * 0.5
            st.score[needed] += 1.0
        if self.predictor is not None:
            target, score = self.predictor.predict(li, ids)
            self._prefetch(target, score, self.prefetch_width or len(needed))

    def _prefetch(self, li: int, score: np.ndarray, width: int) -> None:
        """Load up to ``width`` of the best-scored experts for layer ``li`` ahead of need."""
        st = self.layers[li]
        # future use = this prediction + the decayed, gate-corrected estimate of earlier steps
        st.score = score if st.score is None else score + 0.5 * st.score
        candidates = np.argsort(-score, kind="stable")
        if self.allowed is not None:
            candidates = candidates[np.isin(candidates, self.allowed[li])]
        for e in candidates[: min(width, self.slots)].tolist():
            if e in st.slot_of:
                continue
            if not st.free:
                victim = self._victim(li, set())
                if victim is None or self._value(li, victim) >= score[e]:
                    break  # what is cached is worth more than the rest of the prediction
            self._insert(li, e)
            st.prefetched.add(e)
            self.stats.prefetches += 1

    def _insert(self, li: int, e: int, *protect: set[int]) -> None:
        """Load ``e`` into a free slot, or evict a victim outside the first ``protect`` set
        that leaves one (e.g. this batch's experts, then those it has not run yet)."""
        st = self.layers[li]
        if not st.free:
            victim = None
            for keep in (*protect, {e}):
                victim = self._victim(li, keep)
                if victim is not None:
                    break
            assert victim is not None, f"layer {li}: no evictable expert among {sorted(st.slot_of)}"
            st.free.append(st.slot_of.pop(victim))
            st.prefetched.discard(victim)
            self.stats.evictions += 1
        slot = st.free.pop()
        st.slot_of[e] = slot
        self.load(li, e, slot)

    def _value(self, li: int, e: int) -> float:
        st = self.layers[li]
        if self.policy == "expertflow" and st.score is not None:
            return float(st.score[e])
        return float("inf")

    def _victim(self, li: int, protect: set[int]) -> int | None:
        st = self.layers[li]
        candidates = [e for e in st.slot_of if e not in protect]
        if not candidates:
            return None
        if self.policy == "lru":  # ties: lower id
            return min(candidates, key=lambda e: (st.last_use.get(e, 0), e))
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (st.uses.get(e, 0), st.last_use.get(e, 0), e))
        pop = self.predictor.popularity[li] if self.predictor is not None else np.zeros(self.num_experts)
        score = st.score if st.score is not None else pop
        return min(candidates, key=lambda e: (score[e], pop[e], st.last_use.get(e, 0), e))


def simulate(
    log: RoutingLog,
    slots: int,
    policy: str,
    predictor: PathPredictor | None,
    batch: int = 1,
    prefetch: bool = True,
    prefetch_width: int | None = None,
) -> CacheStats:
    """Replay ``log`` as decode steps: ``batch`` sequences at a time, one token each per step,
    through every MoE layer in order. ``prefetch=False`` drops the predictor's prefetches
    (the expertflow policy still ranks by it)."""
    core = ExpertCacheCore(len(log.layers), log.num_experts, slots, policy, predictor, prefetch_width=prefetch_width)
    if not prefetch:
        core._prefetch = lambda li, score, width: setattr(core.layers[li], "score", score)  # type: ignore[method-assign]
    seqs = log.sequences()
    for start in range(0, len(seqs), batch):
        group = seqs[start : start + batch]
        for t in range(max(len(s) for s in group)):
            rows = [s[t] for s in group if t < len(s)]  # each [L, k]
            step = np.stack(rows)  # [b, L, k]
            for li in range(len(log.layers)):
                core.access(li, step[:, li])
    return core.stats


@dataclass(frozen=True)
class ExpertCacheConfig:
    """The fast tier of one process: ``slots`` experts per MoE layer (``expert_cache_slots``),
    the replacement ``policy``, the path ``predictor`` (None: no prefetch; required by the
    expertflow policy) and the modelled slow-tier link in GB/s."""

    slots: int
    policy: str = "expertflow"
    predictor: PathPredictor | None = None
    bandwidth_gbps: float = 25.0


class TieredExperts:
    """Runs MoE layers' experts from a fast tier of ``config.slots`` experts per layer over
    the slow tier ``slow`` (layer -> LocalExperts: every expert, or an EP rank's share; their
    weights stay where the loader put them). Built once every MoE layer is registered."""

    def __init__(self, slow: dict[int, LocalExperts], config: ExpertCacheConfig):
        self.layers = sorted(slow)
        self.slow = slow
        pred = config.predictor
        if pred is not None and tuple(self.layers) != tuple(pred.layers):
            raise ValueError(f"predictor fitted on layers {pred.layers}, the model's MoE layers are {self.layers}")
        held = min(len(x.expert_ids) for x in slow.values())
        if not 1 <= config.slots <= held:
            raise ValueError(f"expert_cache_slots must be in [1, {held}] (experts held per layer), got {config.slots}")
        first = slow[self.layers[0]]
        _, two_i, h = first.w13.shape
        self.fast = {
            layer: LocalExperts(range(config.slots), h, two_i // 2).to(device=first.w13.device, dtype=first.w13.dtype)
            for layer in self.layers
        }
        self.slow_slot = {layer: x.slot_of() for layer, x in slow.items()}
        num_experts = pred.num_experts if pred is not None else max(max(x.expert_ids) for x in slow.values()) + 1
        allowed = [set(slow[layer].expert_ids) for layer in self.layers]
        self.core = ExpertCacheCore(
            len(self.layers), num_experts, config.slots, config.policy, pred, self._copy, allowed=allowed
        )
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.bandwidth = config.bandwidth_gbps * 1e9
        self.load_bytes = 0
        self.copy_s = 0.0  # measured wall time of the slow -> fast copies (CPU; on GPU: launches)

    @property
    def modelled_load_s(self) -> float:
        """Seconds the loads so far take over the modelled link."""
        return self.load_bytes / self.bandwidth

    def _copy(self, li: int, e: int, slot: int) -> None:
        layer = self.layers[li]
        src, dst, s = self.slow[layer], self.fast[layer], self.slow_slot[layer][e]
        t0 = time.perf_counter()
        with torch.no_grad():
            dst.w13[slot].copy_(src.w13[s])
            dst.w2[slot].copy_(src.w2[s])
        self.copy_s += time.perf_counter() - t0
        self.load_bytes += (src.w13[s].numel() + src.w2[s].numel()) * src.w13.element_size()

    def run(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_weights [T, k], topk_ids [T, k] global ids (-1: held elsewhere,
        skipped) -> [T, H], experts summed in ascending id from zero (combine_local's order)."""
        out = torch.zeros_like(hidden)
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        valid = torch.nonzero(flat >= 0).flatten()
        order = valid[torch.argsort(flat[valid], stable=True)]  # flat indices grouped by expert
        sorted_ids = flat[order].tolist()
        starts: dict[int, tuple[int, int]] = {}
        for i, e in enumerate(sorted_ids):
            a, _ = starts.get(e, (i, i))
            starts[e] = (a, i + 1)
        fast, w = self.fast[layer], topk_weights.reshape(-1)

        def run(e: int, slot: int) -> None:  # experts arrive in ascending id
            a, b = starts[e]
            sel = order[a:b]
            tok = sel // k
            out.index_add_(0, tok, fast.run_expert(slot, hidden[tok]) * w[sel, None])

        self.core.access(self.index[layer], topk_ids.cpu().numpy(), run)
        return out


class ExpertFlowDispatcher:
    """An ExpertDispatcher running every MoE layer's experts through ``TieredExperts`` (the
    slow tier: all experts, as loaded). Outputs equal the local dispatcher's: a miss only
    costs a load."""

    def __init__(self, config: ExpertCacheConfig):
        self.config = config
        self.slow: dict[int, LocalExperts] = {}
        self.tiers: TieredExperts | None = None

    def held_experts(self, layer: int, num_experts: int) -> Sequence[int]:
        return range(num_experts)  # the slow tier holds them all

    def register(self, layer: int, experts: nn.Module) -> None:
        if not isinstance(experts, LocalExperts):
            raise TypeError(f"layer {layer}: expected LocalExperts, got {type(experts).__name__}")
        self.slow[layer] = experts

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.tiers is None:  # every layer is registered and loaded by the first forward
            self.tiers = TieredExperts(self.slow, self.config)
        return self.tiers.run(layer, hidden, topk_weights, topk_ids)
