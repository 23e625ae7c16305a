"""Routing policy: which prefill worker and which decode worker serve a request.

Pure and deterministic: no Ray, no clocks, no randomness, no I/O. The router actor feeds it
load snapshots of live workers; the discrete-event simulator feeds it simulated ones. The
same sequence of ``route``/``observe`` calls always gives the same decisions and events.

Both workers are chosen when the request arrives (Splitwise), so the decode worker can
reserve KV blocks and receive layers while the prefill is still running.

``RoutingPolicy.route(prompt_len, loads)``:
1. ``observe(loads)`` updates the role-switch state (below).
2. Decode-capable = healthy workers whose current role is decode or mixed. None: raise
   ``NoWorkerAvailable``. Only those ``accepting`` (below their in-flight bound) are chosen;
   none accepting: raise ``WorkersBusy``.
3. ``prompt_len < short_prompt_threshold``: prefill on the chosen decode worker itself
   (``prefill_worker=None``, reason SHORT_PROMPT, no transfer).
4. Prefill-capable = healthy workers whose current role is prefill or mixed. None: prefill
   locally on a decode worker (reason NO_PREFILL_WORKER) or, if
   ``fallback_local_prefill`` is off, raise ``NoWorkerAvailable``. Some, none accepting:
   raise ``WorkersBusy`` (a busy pool is not a reason to prefill elsewhere).
5. The prefill policy picks among prefill-capable workers. A mixed worker runs the whole
   request itself (``prefill_worker=None``, ``decode_worker`` = it, reason MIXED); a prefill
   worker is paired with the decode policy's pick (reason SPLIT).

Affinities (``DecodeAffinity``, e.g. cluster/control/expert_affinity.py's s-TS placement of
an expert-parallel pool): before a pool's policy picks, each affinity in turn may pick from the
same candidates given the request's token ids (``prompt_token_ids`` of ``route``); the first
that answers decides, none answering leaves it to the policy. They pick only among the
candidates the steps above allow, so every invariant below holds with them too.

Role switching (Splitwise mixed pool), evaluated by every ``observe``:
- pressure is the smallest pending-prompt-token count among healthy prefill-role workers;
  it is SATURATED when > ``prefill_saturation_tokens`` and RELIEVED when
  < ``prefill_release_tokens`` (strictly lower), otherwise it holds. With no healthy
  prefill worker it holds.
- SATURATED: at most one decode worker per call is promoted to "mixed", while fewer than
  ``max_mixed_workers`` are promoted; only healthy decode workers with
  ``running_requests < mixed_max_running`` and free KV fraction >=
  ``mixed_min_free_kv_fraction`` qualify, the idlest first.
- RELIEVED: every promoted worker returns to "decode".
- A promoted worker that turns unhealthy, disappears from the snapshot or is no longer
  reported as a decode worker is demoted at once.
- Pressure between the two thresholds changes nothing, so roles never flap at a boundary.
Workers configured as "mixed" (a mixed pool) are always mixed and never switched.

Invariants:
- a chosen worker is healthy and present in the snapshot passed to that call;
- ``decode_worker`` is always set; ``prefill_worker`` is None or a prefill-role worker
  different from ``decode_worker``;
- ties are broken by the lowest worker id in natural order ("w2" < "w10"); round-robin
  resumes after the last id it picked, so membership changes don't reset it;
- every role change is recorded once as a ``RoleSwitch`` event with a growing ``seq``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from cluster.config import ROLES, ROUTING_POLICIES, RouterConfig


class NoWorkerAvailable(RuntimeError):
    """No healthy worker can take the request (the frontend maps this to UNAVAILABLE)."""


class WorkersBusy(RuntimeError):
    """Every healthy worker that could take the request is at its in-flight bound (the
    frontend maps this to RESOURCE_EXHAUSTED / 429 with Retry-After)."""


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as last reported. ``role`` is its configured pool role."""

    worker_id: str
    role: str  # "prefill" | "decode" | "mixed"
    healthy: bool = True
    pending_requests: int = 0  # queued, not yet scheduled
    pending_prompt_tokens: int = 0  # prompt tokens of queued + partially prefilled requests
    running_requests: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    # Hashes of the full KV blocks the worker has cached (prefix caching), for "prefix".
    cached_prefix_hashes: frozenset[int] = frozenset()
    # Below its in-flight bound: may be given a new request (role switching ignores this).
    accepting: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker {self.worker_id!r}: role must be one of {list(ROLES)}, got {self.role!r}")
        for name in ("pending_requests", "pending_prompt_tokens", "running_requests", "free_kv_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"worker {self.worker_id!r}: {name} must be >= 0, got {getattr(self, name)}")
        if self.free_kv_blocks > self.total_kv_blocks:
            raise ValueError(
                f"worker {self.worker_id!r}: free_kv_blocks {self.free_kv_blocks} > total {self.total_kv_blocks}"
            )

    @property
    def free_kv_fraction(self) -> float:
        return self.free_kv_blocks / self.total_kv_blocks if self.total_kv_blocks else 0.0


class RouteReason(str, Enum):
    SPLIT = "split"  # prefill on prefill_worker, KV transferred to decode_worker
    SHORT_PROMPT = "short_prompt"  # short prompt prefilled on the decode worker
    MIXED = "mixed"  # a mixed worker runs both phases
    NO_PREFILL_WORKER = "no_prefill_worker"  # prefill pool empty/unhealthy: local prefill


@dataclass(frozen=True)
class RouteDecision:
    prefill_worker: str | None  # None: the decode worker prefills itself, no KV transfer
    decode_worker: str
    reason: RouteReason


@dataclass(frozen=True)
class RoleSwitch:
    seq: int  # 0, 1, 2, ... per RoutingPolicy
    worker_id: str
    old_role: str
    new_role: str
    reason: str  # "prefill_saturated" | "pressure_ended" | "unhealthy" | "removed" | "reconfigured"


def worker_id_key(worker_id: str) -> tuple:
    """Natural sort key: digit runs compare as numbers ("w2" < "w10")."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", worker_id) if p)


# Score hook: how many leading blocks of the request's prefix a worker has cached.
PrefixScore = Callable[[WorkerLoad, Sequence[int]], int]


def leading_prefix_match(load: WorkerLoad, prefix_hashes: Sequence[int]) -> int:
    n = 0
    for h in prefix_hashes:
        if h not in load.cached_prefix_hashes:
            break
        n += 1
    return n


# policy -> sort key of a candidate (smallest wins; the worker id breaks ties), given its
# prefix score. "round_robin" is the one stateful policy and lives in RoutingPolicy._choose.
POLICY_KEYS: dict[str, Callable[[WorkerLoad, int], tuple]] = {
    "jsq": lambda w, score: (w.pending_requests,),
    "token_jsq": lambda w, score: (w.pending_prompt_tokens,),
    "kv": lambda w, score: (-w.free_kv_blocks, w.running_requests),
    "prefix": lambda w, score: (-score, w.pending_prompt_tokens),
}
# The names RouterConfig accepts are exactly the ones implemented here.
assert {*POLICY_KEYS, "round_robin"} == set(ROUTING_POLICIES), "cluster.config.ROUTING_POLICIES out of sync"


class DecodeAffinity(Protocol):
    """Picks a worker for a request from its token ids, or None to leave it to the policy.
    Deterministic, no I/O; may keep counters."""

    def choose(self, cands: Sequence[WorkerLoad], prompt_token_ids: Sequence[int]) -> WorkerLoad | None: ...


class RoutingPolicy:
    """Stateful (round-robin cursors, promoted workers, event log); see module docstring."""

    def __init__(
        self,
        config: RouterConfig,
        prefix_score: PrefixScore = leading_prefix_match,
        max_events: int = 4096,
        affinities: Sequence[DecodeAffinity] = (),
    ) -> None:
        self.config = config
        self.affinities = tuple(affinities)
        self._prefix_score = prefix_score
        self._cursor: dict[str, str] = {}  # pool ("prefill" | "decode") -> last id picked
        self._promoted: set[str] = set()  # decode workers currently switched to "mixed"
        self._roles: dict[str, str] = {}  # current role of every worker last observed
        # Oldest events are dropped past max_events if nobody drains; num_role_switches counts all.
        self._events: deque[RoleSwitch] = deque(maxlen=max_events)
        self.num_role_switches = 0

    # ------------------------------------------------------------------ public API

    @property
    def uses_prefix_hashes(self) -> bool:
        """Whether ``route`` reads ``prefix_hashes`` (a "prefix" policy on either pool)."""
        return "prefix" in (self.config.prefill_policy, self.config.decode_policy)

    def route(
        self,
        prompt_len: int,
        loads: Sequence[WorkerLoad],
        prefix_hashes: Sequence[int] = (),
        prompt_token_ids: Sequence[int] = (),
    ) -> RouteDecision:
        """``prompt_token_ids``: the context to place (read by affinities only)."""
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        self.observe(loads)
        healthy = [w for w in loads if w.healthy]
        decoders = [w for w in healthy if self._roles[w.worker_id] in ("decode", "mixed")]
        if not decoders:
            raise NoWorkerAvailable(self._none_message("decode-capable (decode or mixed)", loads))
        decoders = self._accepting("decode-capable", decoders)
        cfg = self.config
        if prompt_len < cfg.short_prompt_threshold:
            d = self._choose("decode", cfg.decode_policy, decoders, prefix_hashes, prompt_token_ids)
            return RouteDecision(None, d.worker_id, RouteReason.SHORT_PROMPT)
        prefillers = [w for w in healthy if self._roles[w.worker_id] in ("prefill", "mixed")]
        if prefillers:
            prefillers = self._accepting("prefill-capable", prefillers)
        if not prefillers:
            if not cfg.fallback_local_prefill:
                raise NoWorkerAvailable(self._none_message("prefill-capable (prefill or mixed)", loads))
            d = self._choose("decode", cfg.decode_policy, decoders, prefix_hashes, prompt_token_ids)
            return RouteDecision(None, d.worker_id, RouteReason.NO_PREFILL_WORKER)
        p = self._choose("prefill", cfg.prefill_policy, prefillers, prefix_hashes, prompt_token_ids)
        if self._roles[p.worker_id] == "mixed":
            return RouteDecision(None, p.worker_id, RouteReason.MIXED)
        d = self._choose("decode", cfg.decode_policy, decoders, prefix_hashes, prompt_token_ids)
        return RouteDecision(p.worker_id, d.worker_id, RouteReason.SPLIT)

    def observe(self, loads: Sequence[WorkerLoad]) -> list[RoleSwitch]:
        """Update role-switch state from a snapshot; returns the switches this call made."""
        by_id = {w.worker_id: w for w in loads}
        if len(by_id) != len(loads):
            raise ValueError(f"duplicate worker ids in load snapshot: {sorted(w.worker_id for w in loads)}")
        made: list[RoleSwitch] = []
        # 1. promoted workers that can no longer be mixed go back (or away) at once
        for wid in sorted(self._promoted, key=worker_id_key):
            w = by_id.get(wid)
            if w is None:
                made.append(self._switch(wid, "decode", "removed"))
            elif w.role != "decode":
                made.append(self._switch(wid, w.role, "reconfigured"))
            elif not w.healthy:
                made.append(self._switch(wid, "decode", "unhealthy"))
        # 2. pool pressure with hysteresis
        prefill_pending = [w.pending_prompt_tokens for w in loads if w.healthy and w.role == "prefill"]
        if prefill_pending:
            pressure = min(prefill_pending)
            if pressure < self.config.prefill_release_tokens:
                for wid in sorted(self._promoted, key=worker_id_key):
                    made.append(self._switch(wid, "decode", "pressure_ended"))
            elif (
                pressure > self.config.prefill_saturation_tokens and len(self._promoted) < self.config.max_mixed_workers
            ):
                w = self._promotion_candidate(loads)
                if w is not None:
                    made.append(self._switch(w.worker_id, "mixed", "prefill_saturated"))
        self._roles = {w.worker_id: ("mixed" if w.worker_id in self._promoted else w.role) for w in loads}
        return made

    def roles(self) -> dict[str, str]:
        """Current role of every worker in the last snapshot (promoted decode workers: "mixed")."""
        return dict(self._roles)

    def promoted(self) -> frozenset[str]:
        return frozenset(self._promoted)

    def drain_events(self) -> list[RoleSwitch]:
        """Role switches since the last drain, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    # ------------------------------------------------------------------ internals

    def _switch(self, wid: str, new_role: str, reason: str) -> RoleSwitch:
        # only decode workers are ever promoted, so a switch is decode -> mixed (a promotion)
        # or mixed -> back; a promoted worker reconfigured into a mixed pool leaves the
        # promoted set like any demotion (its configured role makes it mixed from now on)
        if reason == "prefill_saturated":
            self._promoted.add(wid)
            old = "decode"
        else:
            self._promoted.discard(wid)
            old = "mixed"
        event = RoleSwitch(self.num_role_switches, wid, old, new_role, reason)
        self.num_role_switches += 1
        self._events.append(event)
        return event

    def _promotion_candidate(self, loads: Sequence[WorkerLoad]) -> WorkerLoad | None:
        cfg = self.config
        eligible = [
            w
            for w in loads
            if w.healthy
            and w.role == "decode"
            and w.worker_id not in self._promoted
            and w.running_requests < cfg.mixed_max_running
            and w.free_kv_fraction >= cfg.mixed_min_free_kv_fraction
        ]
        if not eligible:
            return None
        return min(eligible, key=lambda w: (w.running_requests, -w.free_kv_fraction, worker_id_key(w.worker_id)))

    def _choose(
        self,
        pool: str,
        policy: str,
        cands: list[WorkerLoad],
        prefix_hashes: Sequence[int],
        prompt_token_ids: Sequence[int] = (),
    ) -> WorkerLoad:
        assert cands, "caller checks for an empty candidate list"
        for affinity in self.affinities:
            pick = affinity.choose(cands, prompt_token_ids)
            if pick is not None:
                return pick
        if policy == "round_robin":
            ordered = sorted(cands, key=lambda w: worker_id_key(w.worker_id))
            last = self._cursor.get(pool)
            pick = ordered[0]
            if last is not None:
                pick = next((w for w in ordered if worker_id_key(w.worker_id) > worker_id_key(last)), ordered[0])
            self._cursor[pool] = pick.worker_id
            return pick
        key = POLICY_KEYS.get(policy)
        if key is None:
            raise ValueError(f"unknown routing policy {policy!r}; known: {list(ROUTING_POLICIES)}")
        if policy == "prefix":
            scores = {w.worker_id: self._prefix_score(w, prefix_hashes) for w in cands}
        else:
            scores = {}
        return min(cands, key=lambda w: (*key(w, scores.get(w.worker_id, 0)), worker_id_key(w.worker_id)))

    @staticmethod
    def _accepting(what: str, cands: list[WorkerLoad]) -> list[WorkerLoad]:
        accepting = [w for w in cands if w.accepting]
        if not accepting:
            ids = sorted((w.worker_id for w in cands), key=worker_id_key)
            raise WorkersBusy(f"every healthy {what} worker is at its in-flight bound: {ids}")
        return accepting

    def _none_message(self, what: str, loads: Sequence[WorkerLoad]) -> str:
        unhealthy = sorted((w.worker_id for w in loads if not w.healthy), key=worker_id_key)
        return (
            f"no healthy {what} worker: {len(loads)} worker(s) reported, "
            f"unhealthy: {unhealthy}, roles: {dict(sorted(self._roles.items()))}"
        )
