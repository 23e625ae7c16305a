"""Load snapshots for RoutingPolicy over thousands of simulated instances, in O(log n).

``RoutingPolicy.route`` looks at every WorkerLoad it is given, so a full snapshot costs
O(instances) per request. Its decision, and its role-switch state, depend only on a few
workers, which ``SnapshotIndex.snapshot()`` returns (no others):

- the best prefill-capable (prefill or mixed pool) worker under the prefill policy's key,
  and the best decode-capable (decode or mixed pool) worker under the decode policy's key
  (round robin: the configured successor of the pool's cursor, and the first worker);
- the prefill worker with the fewest pending prompt tokens (``observe``'s pressure);
- every promoted worker (missing from a snapshot, it would be demoted), and, while the
  pressure is over ``prefill_saturation_tokens`` and promotion slots are free, the worker
  ``observe`` would promote.

For every policy the decision on this reduced snapshot equals the decision on the full one
(ties break by worker id, the candidates above include each argmin); the simulator's
``check_routing`` option runs a shadow RoutingPolicy on full snapshots and asserts it.
The keys come from ``cluster.control.routing`` itself, so they cannot drift apart.

Heaps are lazy: an instance whose state changed is re-keyed at the next snapshot (a fresh
entry pushed only where its key changed); stale entries are skipped when they surface.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Callable, Sequence

from cluster.control.routing import POLICY_KEYS, RouteDecision, RouteReason, RoutingPolicy, WorkerLoad
from cluster.tools.sim.instance import Instance

Entry = tuple  # (key, id_key, instance index)


class _LazyHeap:
    """Min-heap of instances by ``key(instance)``. An entry is current iff its key object is
    the one last pushed for its instance (``cur``); re-keying to an equal key pushes nothing."""

    def __init__(self, members: Sequence[Instance], key: Callable[[Instance], tuple]):
        self.members = list(members)
        self.key = key
        self.cur: dict[int, tuple] = {}
        self.heap: list[Entry] = []
        self.rebuild()

    def rebuild(self) -> None:
        self.heap = []
        for m in self.members:
            k = self.cur[m.idx] = self.key(m)
            self.heap.append((k, m.id_key, m.idx))
        heapq.heapify(self.heap)

    def update(self, m: Instance) -> None:
        k = self.key(m)
        if k != self.cur[m.idx]:
            self.cur[m.idx] = k
            heapq.heappush(self.heap, (k, m.id_key, m.idx))

    def top(self, instances: Sequence[Instance]) -> Instance | None:
        heap, cur = self.heap, self.cur
        while heap:
            e = heap[0]
            if cur[e[2]] is e[0]:
                return instances[e[2]]
            heapq.heappop(heap)
        return None

    def first_valid(self, instances: Sequence[Instance], ok: Callable[[Instance], bool], stop: Callable[[tuple], bool]):
        """The smallest current entry whose instance satisfies ``ok``; entries are examined in
        key order until ``stop(key)`` (no later entry can qualify)."""
        heap, cur, skipped, found = self.heap, self.cur, [], None
        while heap:
            e = heap[0]
            if cur[e[2]] is not e[0]:
                heapq.heappop(heap)
                continue
            if stop(e[0]):
                break
            if ok(instances[e[2]]):
                found = instances[e[2]]
                break
            skipped.append(heapq.heappop(heap))
        for e in skipped:
            heapq.heappush(heap, e)
        return found


class SnapshotIndex:
    def __init__(self, instances: Sequence[Instance], policy: RoutingPolicy):
        self.instances = list(instances)
        self.policy = policy
        cfg = self.config = policy.config
        self.dirty: set[int] = set()
        self._ids = {m.worker_id: m for m in self.instances}
        self.prefill_pool = sorted((m for m in instances if m.role in ("prefill", "mixed")), key=lambda m: m.id_key)
        self.decode_pool = sorted((m for m in instances if m.role in ("decode", "mixed")), key=lambda m: m.id_key)
        self._pool_keys = {
            "prefill": [m.id_key for m in self.prefill_pool],
            "decode": [m.id_key for m in self.decode_pool],
        }
        self._cursor: dict[str, str] = {}  # pool -> last worker id it picked (round robin)
        self.heaps: list[_LazyHeap] = []
        self._member_of: list[list[_LazyHeap]] = [[] for _ in self.instances]  # instance -> its heaps
        self.pick: dict[str, _LazyHeap | None] = {}
        for pool, members, policy_name in (
            ("prefill", self.prefill_pool, cfg.prefill_policy),
            ("decode", self.decode_pool, cfg.decode_policy),
        ):
            if policy_name == "round_robin" or not members:
                self.pick[pool] = None
                continue
            key = POLICY_KEYS[policy_name]
            self.pick[pool] = self._heap(members, lambda m, key=key: key(m, 0))
        prefill_role = [m for m in instances if m.role == "prefill"]
        decode_role = [m for m in instances if m.role == "decode"]
        self.pressure = self._heap(prefill_role, lambda m: (m.pending_prompt_tokens,)) if prefill_role else None
        self.promote = (
            self._heap(decode_role, lambda m: (m.running_requests, -m.free_kv_fraction))
            if decode_role and cfg.max_mixed_workers > 0
            else None
        )

    def _heap(self, members: Sequence[Instance], key: Callable[[Instance], tuple]) -> _LazyHeap:
        h = _LazyHeap(members, key)
        self.heaps.append(h)
        for m in members:
            self._member_of[m.idx].append(h)
        return h

    def _flush(self) -> None:
        """Re-key every instance touched since the last snapshot."""
        if not self.dirty:
            return
        inst, member_of = self.instances, self._member_of
        for h in self.heaps:
            if len(h.heap) > 4 * len(h.members) + 64:
                h.rebuild()  # mostly stale entries: start over
        for i in self.dirty:
            m = inst[i]
            for h in member_of[i]:
                h.update(m)
        self.dirty.clear()

    def snapshot(self) -> list[WorkerLoad]:
        """The reduced snapshot for the next ``route`` call (see module docstring)."""
        self._flush()
        inst = self.instances
        cfg = self.config
        chosen: dict[int, Instance] = {}
        for pool in ("prefill", "decode"):
            h = self.pick[pool]
            if h is not None:
                m = h.top(inst)
                if m is not None:
                    chosen[m.idx] = m
            else:
                for m in self._round_robin(pool):
                    chosen[m.idx] = m
        promoted = self.policy.promoted()
        for wid in promoted:
            m = self.by_id(wid)
            chosen[m.idx] = m
        if self.pressure is not None:
            p = self.pressure.top(inst)
            if p is not None:
                chosen[p.idx] = p
                if (
                    self.promote is not None
                    and p.pending_prompt_tokens > cfg.prefill_saturation_tokens
                    and len(promoted) < cfg.max_mixed_workers
                ):
                    c = self.promote.first_valid(
                        inst,
                        ok=lambda m: (
                            m.worker_id not in promoted and m.free_kv_fraction >= cfg.mixed_min_free_kv_fraction
                        ),
                        stop=lambda key: key[0] >= cfg.mixed_max_running,
                    )
                    if c is not None:
                        chosen[c.idx] = c
        return [m.load() for m in chosen.values()]

    def full_snapshot(self) -> list[WorkerLoad]:
        return [m.load() for m in self.instances]

    def routed(self, d: RouteDecision) -> None:
        """Track the round-robin cursors from the decision (which pool chose which worker)."""
        if d.reason == RouteReason.SPLIT:
            self._cursor["prefill"] = d.prefill_worker
            self._cursor["decode"] = d.decode_worker
        elif d.reason == RouteReason.MIXED:
            self._cursor["prefill"] = d.decode_worker
        else:
            self._cursor["decode"] = d.decode_worker

    # ------------------------------------------------------------------ internals
    def _round_robin(self, pool: str) -> list[Instance]:
        members = self.prefill_pool if pool == "prefill" else self.decode_pool
        if not members:
            return []
        out = [members[0]]
        last = self._cursor.get(pool)
        if last is not None:
            i = bisect_right(self._pool_keys[pool], self.by_id(last).id_key)
            if i < len(members):
                out.append(members[i])
        return out

    def by_id(self, wid: str) -> Instance:
        return self._ids[wid]
