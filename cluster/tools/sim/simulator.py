"""Discrete-event simulator of a Splitwise-style cluster: prefill, decode and mixed pools.

    sim = Simulator(StepTimeModel(ProfileTable.load(path)), SimConfig(num_prefill=4, num_decode=4))
    result = sim.run(workload)            # SimResult: per-request timestamps + summary()

Event loop: one heap of (time, seq, kind, object, token) with a global sequence number, so
equal times pop in push order (a step end whose token is stale was replaced, and is skipped) and a run is a pure function of (table, config, workload): no wall
clock, the only randomness is the seeded per-step jitter (off by default). Arrivals are
merged in from the sorted workload instead of being pushed.

Per request:
    arrival (+ ``dispatch_s``) -> RoutingPolicy.route on a load snapshot of the instances
    SPLIT:  prefill instance queues the prompt; decode instance reserves blocks for the
            prompt's KV (FIFO while full). Prefill done -> first token (TTFT) -> the KV moves
            over the prefill instance's egress link (below) -> the decode instance admits
            the request and decodes it; the prefill instance frees its blocks.
    other:  (short prompt, mixed worker, no prefill worker) the chosen decode-capable
            instance prefills and decodes the request itself.
As in the real router the first token reaches the client when the prefill finishes; the
KV hand-over delays the second token (``SimRequest.transfer_s``, summary "kv_handover_s").

KV link (one per prefill instance, FIFO): ``bytes = prompt * kv_bytes_per_token`` at
``bandwidth``. Layer-wise, the bytes of a chunk's layer go out while later layers compute,
so only the last layer of the last chunk is left when the prefill ends:
``done = max(start + bytes / bw, prefill_end + last_chunk_bytes / layers / bw) + latency``
with ``start`` = when the first chunk began computing and the reservation was made (and the
link was free). Whole-cache: ``done = max(prefill_end, link free) + bytes / bw + latency``.
A reservation made only after the prefill ended starts the whole transfer then.

Not modelled: prefix caching, failures and timeouts, decode-side ingress contention, CPU or
network shared between instances (each is its own machine), speculative decoding, tokens
(lengths come from the workload; outputs never stop early). Load snapshots are exact, except
that a decode instance in a macro-step shows the free blocks of the end of its run.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from cluster.config import RouterConfig
from cluster.control.routing import RoleSwitch, RouteDecision, RouteReason, RoutingPolicy
from cluster.tools.sim.instance import Instance
from cluster.tools.sim.metrics import SimResult
from cluster.tools.sim.model import StepTimeModel
from cluster.tools.sim.request import SimRequest
from cluster.tools.sim.snapshot import SnapshotIndex
from cluster.tools.sim.workload import Workload

_STEP_END, _TRANSFER_DONE = 0, 1


@dataclass(frozen=True)
class LinkConfig:
    bandwidth_gbps: float = 100.0  # Gbit/s out of each prefill instance
    latency_s: float = 20e-6  # added once per transfer
    layerwise: bool = True  # stream KV layer by layer during the prefill (else after it)

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"link bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        if self.latency_s < 0:
            raise ValueError(f"link latency_s must be >= 0, got {self.latency_s}")


@dataclass(frozen=True)
class SimConfig:
    num_prefill: int = 1  # instances in the "prefill" pool
    num_decode: int = 1  # instances in the "decode" pool
    num_mixed: int = 0  # instances in a "mixed" pool (each prefills and decodes its requests)
    router: RouterConfig = field(default_factory=RouterConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    # Per-instance engine limits; None: the profile table's engine section.
    num_blocks: int | None = None
    block_size: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    dispatch_s: float = 0.0  # arrival -> placement (router and RPC hops), added to every request
    step_jitter: float = 0.0  # sigma of a lognormal factor (mean 1) on every step time; 0 = exact
    horizon_s: float | None = None  # stop the clock here; unfinished requests are reported
    seed: int = 0  # seeds the jitter
    check_routing: bool = False  # also route on full snapshots (shadow policy); assert equal
    # Longest macro-step (pure-decode steps timed in closed form; see instance.py); 1 = step
    # by step. Jitter needs per-step draws, so step_jitter > 0 runs step by step.
    macro_max_steps: int = 128

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "num_mixed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_decode + self.num_mixed < 1:
            raise ValueError("need at least one decode or mixed instance")
        for name in ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.dispatch_s < 0 or self.step_jitter < 0:
            raise ValueError("dispatch_s and step_jitter must be >= 0")
        if self.macro_max_steps < 1:
            raise ValueError(f"macro_max_steps must be >= 1, got {self.macro_max_steps}")
        if self.horizon_s is not None and not self.horizon_s > 0:
            raise ValueError(f"horizon_s must be > 0, got {self.horizon_s}")

    @property
    def num_instances(self) -> int:
        return self.num_prefill + self.num_decode + self.num_mixed


class Simulator:
    def __init__(self, model: StepTimeModel, config: SimConfig):
        self.model = model
        self.config = config
        t = model.table
        self.block_size = config.block_size or t.block_size
        self.num_blocks = config.num_blocks or t.num_blocks
        self.budget = config.max_num_batched_tokens or t.max_num_batched_tokens
        self.max_seqs = config.max_num_seqs or t.max_num_seqs
        if self.budget < self.max_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.budget}) must be >= max_num_seqs ({self.max_seqs}): "
                "the simulator serves every decoding request in every step"
            )
        self.bytes_per_s = config.link.bandwidth_gbps * 1e9 / 8
        self.macro_max_steps = 1 if config.step_jitter > 0 else config.macro_max_steps
        self.kv_bytes = t.kv_bytes_per_token

    # ------------------------------------------------------------------ run
    def run(self, workload: Workload) -> SimResult:
        cfg = self.config
        self._check_fits(workload)
        self.instances = insts = self._build_instances()
        self.policy = RoutingPolicy(cfg.router, max_events=1 << 20)
        self.index = SnapshotIndex(insts, self.policy)
        for m in insts:
            m.dirty = self.index.dirty
        self.shadow = RoutingPolicy(cfg.router, max_events=1 << 20) if cfg.check_routing else None
        self.checked_switches: list[RoleSwitch] = []  # check_routing drains the policy's events here
        self.heap: list[tuple[float, int, int, object, int]] = []  # (time, seq, kind, obj, token)
        self.seq = 0
        self.rng = random.Random(cfg.seed)
        self.num_preemptions = 0
        self.itl_dt: list[float] = []
        self.itl_w: list[float] = []
        self.num_events = 0
        self.requests = reqs = [
            SimRequest(i, a, p, o)
            for i, (a, p, o) in enumerate(zip(workload.arrival_s, workload.prompt_lens, workload.output_lens))
        ]
        self.num_finished = 0
        wall0 = time.perf_counter()
        heap = self.heap
        horizon = cfg.horizon_s if cfg.horizon_s is not None else float("inf")
        dispatch = cfg.dispatch_s
        now = 0.0
        i, n = 0, len(reqs)
        while True:
            if i < n and (not heap or reqs[i].arrival + dispatch <= heap[0][0]):
                t = reqs[i].arrival + dispatch
                if t > horizon:
                    break
                now = t
                self._route(reqs[i], t)
                i += 1
            elif heap:
                t, _, kind, obj, token = heapq.heappop(heap)
                if t > horizon:
                    break
                now = t
                self.num_events += 1
                if kind == _STEP_END:
                    if token == obj.token:  # else replaced by an interrupted macro-step's end
                        obj.end_step(self, t)
                else:
                    self._transfer_done(obj, t)
            else:
                break
        wall = time.perf_counter() - wall0
        return SimResult(
            workload=workload.name,
            config=cfg,
            table_source=self.model.table.source,
            illustrative=self.model.table.illustrative,
            requests=reqs,
            instances=insts,
            itl_dt=self.itl_dt,
            itl_w=self.itl_w,
            role_switches=self.checked_switches + self.policy.drain_events(),
            num_events=self.num_events + i,
            num_preemptions=self.num_preemptions,
            end_s=now,
            wall_s=wall,
        )

    def _build_instances(self) -> list[Instance]:
        cfg = self.config
        out: list[Instance] = []
        for role, count in (("prefill", cfg.num_prefill), ("decode", cfg.num_decode), ("mixed", cfg.num_mixed)):
            for k in range(count):
                out.append(
                    Instance(
                        len(out), f"{role}-{k}", role, self.num_blocks, self.block_size, self.budget, self.max_seqs
                    )
                )
        return out

    def _check_fits(self, workload: Workload) -> None:
        # a request's KV peaks at prompt + output - 1 tokens (the last token's is never computed)
        cap = self.num_blocks * self.block_size
        worst = max((p + o - 1 for p, o in zip(workload.prompt_lens, workload.output_lens)), default=0)
        if worst > cap:
            k = max(range(len(workload)), key=lambda j: workload.prompt_lens[j] + workload.output_lens[j])
            raise ValueError(
                f"request {k} of workload {workload.name!r} needs {worst} tokens of KV "
                f"(prompt {workload.prompt_lens[k]} + output {workload.output_lens[k]}) but an instance "
                f"holds {cap} ({self.num_blocks} blocks of {self.block_size}); clip the workload "
                "(Workload.clipped / --max-prompt --max-output) or give more blocks"
            )

    # ------------------------------------------------------------------ hooks for instances
    def step_time(self, prefill_tokens: int, quad: int, num_decode: int, ctx_sum: int) -> float:
        dt = self.model.step_time(prefill_tokens, quad, num_decode, ctx_sum)
        sigma = self.config.step_jitter
        if sigma:
            dt *= self.rng.lognormvariate(-0.5 * sigma * sigma, sigma)
        return dt

    def schedule_step_end(self, t: float, inst: Instance) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, _STEP_END, inst, inst.token))

    def itl_sample(self, dt: float, weight: float) -> None:
        self.itl_dt.append(dt)
        self.itl_w.append(weight)

    def on_finished(self, req: SimRequest, now: float) -> None:
        if req.t_done >= 0:
            raise AssertionError(f"request {req.idx} finished twice ({req.t_done} and {now})")
        req.t_done = now
        self.num_finished += 1
        if req.prefill_inst >= 0 and req.decode_inst != req.prefill_inst and req.t_prefilled < 0:
            # ended at its prefill on a prefill instance: the decode side drops its reservation
            self.instances[req.decode_inst].cancel_reservation(req, self, now)

    def on_prefilled(self, req: SimRequest, now: float) -> None:
        if req.t_reserved >= 0:
            self._start_transfer(req, now)

    def on_reserved(self, req: SimRequest, now: float) -> None:
        if req.t_prefilled >= 0:
            self._start_transfer(req, now)

    # ------------------------------------------------------------------ internals
    def _route(self, req: SimRequest, now: float) -> None:
        d = self.policy.route(req.prompt, self.index.snapshot())
        if self.shadow is not None:
            self._check_shadow(req, d)
        self.index.routed(d)
        req.t_route = now
        req.reason = d.reason.value
        dec = self.instances[self._idx(d.decode_worker)]
        req.decode_inst = dec.idx
        if d.reason == RouteReason.SPLIT:
            pre = self.instances[self._idx(d.prefill_worker)]
            req.prefill_inst = pre.idx
            dec.enqueue_reservation(req, self, now)
            pre.enqueue_prefill(req, self, now)
        else:
            req.prefill_inst = dec.idx
            dec.enqueue_prefill(req, self, now)

    def _idx(self, worker_id: str | None) -> int:
        return self.index.by_id(worker_id).idx

    def _check_shadow(self, req: SimRequest, d: RouteDecision) -> None:
        full = self.shadow.route(req.prompt, self.index.full_snapshot())
        if full != d:
            raise AssertionError(f"request {req.idx}: reduced snapshot routed {d}, full snapshot {full}")
        got, want = self.policy.drain_events(), self.shadow.drain_events()
        if [_switch_key(e) for e in got] != [_switch_key(e) for e in want]:
            raise AssertionError(f"request {req.idx}: role switches differ: {got} vs {want}")
        self.checked_switches.extend(got)

    def _start_transfer(self, req: SimRequest, now: float) -> None:
        pre = self.instances[req.prefill_inst]
        link = self.config.link
        nbytes = req.prompt * self.kv_bytes
        full = nbytes / self.bytes_per_s
        if link.layerwise and req.t_reserved <= req.t_prefilled:
            start = max(pre.link_free, req.t_prefill_start, req.t_reserved)
            tail = req.last_chunk * self.kv_bytes / self.model.num_layers / self.bytes_per_s
            end = max(start + full, req.t_prefilled + tail)
        else:
            start = max(pre.link_free, req.t_prefilled, req.t_reserved)
            end = start + full
        pre.link_free = end
        self.seq += 1
        heapq.heappush(self.heap, (end + link.latency_s, self.seq, _TRANSFER_DONE, req, 0))

    def _transfer_done(self, req: SimRequest, now: float) -> None:
        req.transfer_s = now - req.t_prefilled
        self.instances[req.prefill_inst].release_held(req, self, now)
        self.instances[req.decode_inst].admit_transferred(req, self, now)


def _switch_key(e: RoleSwitch) -> tuple:
    return (e.worker_id, e.old_role, e.new_role, e.reason)
