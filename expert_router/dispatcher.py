"""The expert-parallel ExpertDispatcher: each rank of an EP group holds 1/N of every MoE
layer's routed experts; tokens travel to the ranks that hold their top-k experts and back.

Topology (data-parallel attention, expert-parallel FFN): every rank runs attention, the
dense layers, the router gates and the shared expert for its OWN requests (all replicated);
only the routed experts are split, by an ``ExpertPlacement``. Per MoE layer, per forward:

    source:    each token goes once to every distinct rank holding one of its top-k experts
               (rows ordered by destination rank, then token): hidden [S, H] + top-k weights
               [S, k] (zero where the expert sits elsewhere) + top-k ids [S, k] (-1 there)
    dispatch:  all-to-all with per-peer splits (the header below carries the counts)
    expert:    the receiver runs its held experts on what it received; per received row, the
               weighted sum of that rank's experts, in ascending expert id, from zero [R, H]
    combine:   all-to-all back (splits reversed) -> [S, H] in the sent order
    sum:       out[t] = 0 + partial from the lowest rank + ... in ascending rank order (fixed,
               independent of arrival). A token whose experts all sit on one rank is summed in
               the local dispatcher's order; the expert GEMMs see other row counts than a
               local batch, so results agree to rounding, not bit for bit.

Lock-step rounds. Ranks run their own requests, so in one engine step one rank may run a
forward while another has nothing to compute. Every collective is issued by every rank in
the same order (engine/parallel.py), so each MoE layer is one *round* that starts with a
header all-gather of one int64 row per rank: [count to rank 0 .. W-1, state, layer, flags
(1: unfinished requests, 2: stop)]. A rank in a forward sends ACTIVE with its layer; a rank
done with its step sends DONE from ``end_step``, and still serves the round (zero rows out,
its experts' work in). When every rank sends DONE the step is over for all of them;
``end_step`` returns whether any rank still has unfinished requests, so the group stops
stepping together. Active ranks must agree on the layer (every forward starts right after an
all-DONE round or another forward, and passes the same MoE layers in order); a disagreement
is a bug and raises. Cost: one extra W x (W + 3) int64 all-gather per MoE layer (it carries
the per-peer counts, which the all-to-all needs anyway) and one per step.

Failure: every collective is bounded by the communicator's timeout, so a dead or hung rank
fails the others' current round with ``CommunicationError`` within it (nothing hangs); the
group is then unusable and is formed again (engine/parallel.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.models.moe import LocalExperts, combine_local
from engine.parallel import Communicator
from expert_router.expertflow import ExpertCacheConfig, TieredExperts
from expert_router.placement import ExpertPlacement

ACTIVE, DONE = 1, 0
FLAG_UNFINISHED, FLAG_STOP = 1, 2  # header flags


class EPProtocolError(RuntimeError):
    """The ranks of an EP group disagree on where they are (a bug, never a data condition)."""


@dataclass
class EPStats:
    """Cumulative, this rank's view. Bytes count what this rank sends to OTHER ranks (its own
    rows move through the all-to-all too, but never cross a link)."""

    rounds: int = 0  # MoE layer rounds this rank took part in (active or serving)
    tokens: int = 0  # tokens this rank routed (summed over layers)
    pairs: int = 0  # (token, destination rank) rows it sent: tokens * distinct ranks per token
    remote_pairs: int = 0  # of those, rows to another rank
    local_tokens: int = 0  # tokens (summed over layers) whose top-k all sit on this rank
    dispatch_bytes: int = 0  # remote dispatch bytes (hidden + weights + ids)
    combine_bytes: int = 0  # remote combine bytes (partial sums back to their sources)
    comm_s: float = 0.0  # wall time in header + dispatch + combine collectives
    expert_s: float = 0.0  # wall time running held experts
    per_layer_remote_pairs: dict[int, int] = field(default_factory=dict)

    @property
    def distinct_ranks_per_token(self) -> float:
        return self.pairs / self.tokens if self.tokens else 0.0


class EPDispatcher:
    """``engine.moe.ExpertDispatcher`` over an EP group. Lifecycle: built with the group's
    communicator (or its rank, then ``connect``) and placement, passed to
    ``EngineCore(dispatcher=)`` (the model asks
    ``held_experts`` / ``register`` while it is built, so each rank loads only its experts),
    then driven step by step: ``engine.step()`` (its forwards call ``dispatch``) followed by
    ``end_step``, on every rank, until ``end_step`` returns False (``run_lockstep``)."""

    def __init__(
        self,
        comm: Communicator | None,
        placement: ExpertPlacement,
        top_k: int,
        cache: ExpertCacheConfig | None = None,
        rank: int | None = None,
    ):
        """``comm``: the EP group's communicator, or None with ``rank`` given: a worker builds
        (and loads) its engine for its rank before the group forms, then ``connect``s.
        ``cache``: run this rank's experts through an ExpertFlow fast tier of ``cache.slots``
        per layer (its slow tier: the rank's share as loaded); None: all held experts resident."""
        if comm is None and rank is None:
            raise ValueError("EPDispatcher needs a communicator or, before the group forms, its rank")
        self.rank = comm.rank if comm is not None else int(rank)  # type: ignore[arg-type]
        self.world_size = placement.world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the placement's {self.world_size} ranks")
        self._comm: Communicator | None = None
        self.placement = placement
        if comm is not None:
            self.connect(comm)
        self.top_k = top_k  # the model's; a served round builds zero-row payloads [0, H + top_k]
        self.experts: dict[int, LocalExperts] = {}
        self._owner: dict[int, torch.Tensor] = {}  # layer -> [E] owner rank
        self._slot: dict[int, torch.Tensor] = {}  # layer -> [E] slot here, -1 elsewhere
        self.stats = EPStats()
        self.stop_agreed = False  # a rank asked the group to stop (end_step(stop=True))
        self.cache = cache
        self.tiers: TieredExperts | None = None  # built at the first round (every layer registered)

    def connect(self, comm: Communicator) -> None:
        """Attach the EP group's communicator (once): its rank and size must be this one's."""
        if self._comm is not None:
            raise EPProtocolError(f"EP rank {self.rank} is already connected to a group")
        if comm.world_size != self.world_size or comm.rank != self.rank:
            raise ValueError(
                f"placement is for rank {self.rank} of {self.world_size} ranks, the communicator is "
                f"rank {comm.rank} of {comm.world_size}"
            )
        self._comm = comm

    @property
    def connected(self) -> bool:
        return self._comm is not None

    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            raise EPProtocolError(f"EP rank {self.rank} is not connected to its group yet (connect)")
        return self._comm

    # ------------------------------------------------------------------ ExpertDispatcher seam
    def held_experts(self, layer: int, num_experts: int) -> Sequence[int]:
        if self.placement.num_experts(layer) != num_experts:
            raise ValueError(
                f"placement layer {layer} places {self.placement.num_experts(layer)} experts, the model has {num_experts}"
            )
        return self.placement.experts_of(layer, self.rank)

    def register(self, layer: int, experts: nn.Module) -> None:
        if not isinstance(experts, LocalExperts):
            raise TypeError(f"layer {layer}: expected LocalExperts, got {type(experts).__name__}")
        held = self.placement.experts_of(layer, self.rank)
        if experts.expert_ids != held:
            raise ValueError(f"layer {layer}: module holds experts {experts.expert_ids}, placement says {held}")
        self.experts[layer] = experts
        owner = self.placement.owner_table(layer)
        slot = torch.full_like(owner, -1)
        slot[list(held)] = torch.arange(len(held), device="cpu")
        self._owner[layer], self._slot[layer] = owner, slot

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden: [T, H]; topk_weights: [T, k]; topk_ids: [T, k] global ids -> [T, H]."""
        t, k = topk_ids.shape
        w = self.world_size
        owner = self._owner[layer].to(topk_ids.device)[topk_ids]  # [T, k] rank of each choice
        goes = torch.zeros(t, w, dtype=torch.bool, device=hidden.device)
        goes.scatter_(1, owner, True)  # [T, W]: token t has an expert on rank r
        dest, tok = torch.nonzero(goes.t(), as_tuple=True)  # rows by rank, then token
        here = owner[tok] == dest[:, None]  # [S, k]: the choices the destination holds
        payload = torch.cat((hidden[tok], torch.where(here, topk_weights[tok], 0)), dim=1)  # [S, H + k]
        ids = torch.where(here, topk_ids[tok], -1).to(torch.int32)  # [S, k]
        send = torch.bincount(dest, minlength=w).tolist()
        st = self.stats
        st.tokens += t
        st.pairs += len(tok)
        st.local_tokens += int((goes[:, self.rank] & (goes.sum(dim=1) == 1)).sum())
        remote = len(tok) - send[self.rank]
        st.remote_pairs += remote
        st.per_layer_remote_pairs[layer] = st.per_layer_remote_pairs.get(layer, 0) + remote
        table = self._gather_header(send, ACTIVE, layer, FLAG_UNFINISHED)
        if self._active_layer(table) != layer:
            raise EPProtocolError(f"EP rank {self.rank} at layer {layer}, the round is at another")
        back = self._serve(table, layer, payload, ids.contiguous(), send)  # [S, H]
        out = torch.zeros_like(hidden)
        start = 0
        for n in send:  # ascending rank: the fixed summation order
            if n:
                rows = tok[start : start + n]
                out[rows] += back[start : start + n]
                start += n
        return out

    # ------------------------------------------------------------------ lock-step
    @torch.inference_mode()  # rounds served here run experts as the model's forwards do (an
    # ExpertFlow fast tier built inside a forward holds inference tensors it updates in place)
    def end_step(self, unfinished: bool, stop: bool = False) -> bool:
        """This rank is done with its step's forwards: serve rounds (zero rows out, this rank's
        experts' work in) until every rank is done. ``unfinished``: this rank still has
        requests. Returns True while any rank of the group has (step again), False when none.
        ``stop``: ask the group to stop stepping; once any rank asked, every rank's
        ``stop_agreed`` is True after this same call, and no rank issues another round."""
        w = self.world_size
        flags = (FLAG_UNFINISHED if unfinished else 0) | (FLAG_STOP if stop else 0)
        while True:
            table = self._gather_header([0] * w, DONE, -1, flags)
            layer = self._active_layer(table)
            if layer is None:
                final = table[:, w + 2]
                self.stop_agreed = bool(((final & FLAG_STOP) != 0).any())
                return bool(((final & FLAG_UNFINISHED) != 0).any())
            experts = self.experts[layer]
            h, k = experts.w13.shape[2], self.top_k
            payload = torch.empty(0, h + k, dtype=experts.w13.dtype, device=self.comm.device)
            self._serve(table, layer, payload, torch.empty(0, k, dtype=torch.int32, device=self.comm.device), [0] * w)

    def _gather_header(self, send: list[int], state: int, layer: int, flags: int) -> torch.Tensor:
        """All-gather one round header per rank -> [W, W + 3]: row p = rank p's
        [count to rank 0 .. W-1, state, layer, flags]."""
        w = self.world_size
        row = torch.tensor([[*send, state, layer, flags]], dtype=torch.int64, device=self.comm.device)
        t0 = time.perf_counter()
        table = self.comm.all_gather(row)
        self.stats.comm_s += time.perf_counter() - t0
        return table.view(w, w + 3)

    def _active_layer(self, table: torch.Tensor) -> int | None:
        """The layer the ACTIVE ranks are at (None: every rank is DONE)."""
        w = self.world_size
        states, layers = table[:, w].tolist(), table[:, w + 1].tolist()
        active = {lay for s, lay in zip(states, layers, strict=True) if s == ACTIVE}
        if len(active) > 1:
            raise EPProtocolError(
                f"EP rank {self.rank}: active ranks are at different layers {layers} (states {states})"
            )
        return active.pop() if active else None

    def _serve(
        self, table: torch.Tensor, layer: int, payload: torch.Tensor, ids: torch.Tensor, send: list[int]
    ) -> torch.Tensor:
        """Dispatch ``payload`` / ``ids`` ([S, H + k] / [S, k], rank p's rows at its offset),
        run the held experts on what arrives, combine back -> [S, H] in the sent order."""
        w, st = self.world_size, self.stats
        recv = [int(table[p, self.rank]) for p in range(w)]  # rows each rank sends here
        k = ids.shape[1]
        h = payload.shape[1] - k
        elt = payload.element_size()
        st.rounds += 1
        st.dispatch_bytes += sum(n for p, n in enumerate(send) if p != self.rank) * ((h + k) * elt + k * 4)
        st.combine_bytes += sum(n for p, n in enumerate(recv) if p != self.rank) * h * elt
        t0 = time.perf_counter()
        pending_payload = self.comm.all_to_all_async(payload, send, recv)
        pending_ids = self.comm.all_to_all_async(ids, send, recv)
        got, got_ids = pending_payload.wait(), pending_ids.wait()  # [R, H + k], [R, k]
        t1 = time.perf_counter()
        valid = got_ids >= 0
        slots = torch.where(valid, self._slot[layer].to(got_ids.device)[got_ids.clamp(min=0).long()], -1)
        if bool((slots[valid] < 0).any()):
            raise EPProtocolError(f"EP rank {self.rank} layer {layer}: received tokens for experts it does not hold")
        if self.cache is None:
            partial = combine_local(self.experts[layer], got[:, :h].contiguous(), got[:, h:], slots)  # [R, H]
        else:
            if self.tiers is None:
                self.tiers = TieredExperts(self.experts, self.cache)
            partial = self.tiers.run(layer, got[:, :h].contiguous(), got[:, h:], got_ids.long())  # [R, H]
        t2 = time.perf_counter()
        back = self.comm.all_to_all(partial, recv, send)  # [S, H]
        st.comm_s += (t1 - t0) + (time.perf_counter() - t2)
        st.expert_s += t2 - t1
        return back


def run_lockstep(engine, dispatcher: EPDispatcher, before_step: Callable[[int], None] | None = None) -> int:
    """Step ``engine`` (an EngineCore built with ``dispatcher``) in lock-step with the other
    ranks of its EP group until no rank has unfinished requests. Every rank calls this at the
    same time; a rank with no requests of its own still serves its experts.
    ``before_step(i)`` runs before this rank's i-th step (adds or aborts requests: local
    changes only, never a collective). Returns the number of steps taken."""
    steps = 0
    while True:
        if before_step is not None:
            before_step(steps)
        if engine.has_work():
            engine.step()
        steps += 1
        if not dispatcher.end_step(unfinished=engine.has_work()):
            return steps


class LockstepStepper:
    """The step of a worker's engine loop (engine.runtime.loop.EngineLoop) whose engine is
    one rank of an EP group: ``EngineLoop(step=stepper.step, has_work=stepper.has_work)``.

    Every call is one group iteration: this rank's engine steps if it has work, then
    ``end_step`` serves the other ranks' rounds and ends with a round every rank takes part
    in, so iterations stay aligned across ranks whatever arrives where in between (requests
    are added by the loop's queued calls, between iterations). When no rank has work the
    iteration sleeps ``idle_s``: idle ranks poll the group with one header round per
    iteration. ``has_work`` is always True: a rank takes part in every round while the group
    runs. ``request_stop()`` (any thread) makes the group stop together: the iteration in
    which any rank asked is the last one of every rank (none issues another collective), so
    each loop can then be stopped at leisure."""

    def __init__(
        self,
        step: Callable[[], object],
        has_work: Callable[[], bool],
        dispatcher: EPDispatcher,
        idle_s: float = 0.005,
    ):
        """``step`` / ``has_work``: what the worker's loop would call without EP (the
        worker's own step, which steps its engine and publishes its tokens; the engine's
        has_work)."""
        self._step, self._has_work, self.dispatcher, self.idle_s = step, has_work, dispatcher, idle_s
        self.iterations = 0
        self._stop_requested = False

    def request_stop(self) -> None:
        self._stop_requested = True

    @property
    def stopped(self) -> bool:
        return self.dispatcher.stop_agreed

    def has_work(self) -> bool:
        return True

    def step(self) -> None:
        if self.stopped:
            time.sleep(self.idle_s)  # the group stopped: no more rounds
            return
        if self._has_work():
            self._step()
        self.iterations += 1
        busy = self.dispatcher.end_step(unfinished=self._has_work(), stop=self._stop_requested)
        if not busy and not self.stopped:
            time.sleep(self.idle_s)
