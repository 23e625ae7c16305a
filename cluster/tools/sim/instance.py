"""One simulated engine instance: continuous batching, chunked prefill, paged KV memory.

Mirrors ``engine.scheduler.Scheduler`` closely enough for timing, without tokens:

- a step serves every decoding request (1 token each) and, with the rest of the token
  budget, prompt chunks: running partial prefills first, then waiting prompts in FIFO order
  while ``max_num_seqs`` and free blocks allow (no new admissions in a step that preempted);
- blocks are taken as tokens get KV: a prompt chunk takes the blocks it fills, a decoding
  request one more block each time its context crosses a block boundary;
- a step that lacks blocks preempts by recompute (blocks freed, the request re-queued at
  the front, later recomputing prompt + output so far): for decode growth the newest
  running request, for a prompt chunk the newest partial prefill;
- decode-capable instances hold a FIFO of KV reservations for incoming transfers (served
  before local work, as the decode worker does); prefill-role instances keep a prefilled
  request's blocks until its transfer is done.

Decoding requests are not visited per step: each has a finish step index in a heap, the
context sum grows by the batch size per step, and the requests that need a new block at
step k are counted by ``k mod block_size`` (``phase``).

Macro-steps: a step with only decoding requests (no prompt chunk, nobody joining or waiting
for blocks) runs as up to ``sim.macro_max_steps`` identical-batch steps ending at the next
finish (and before memory runs out), timed in closed form (``StepTimeModel.decode_run``).
An event that would change the batch mid-run (a request to join or to prefill here, a KV
reservation that needs the run's later growth blocks) first ``interrupt``s it: the run is
cut after the step in flight. Per-request times equal step-by-step ones; load snapshots
show the free blocks at the end of the run, and a run's ITL samples are its first and last
step durations (half the weight each).

Lifecycle of a request on an instance: waiting -> prefilling -> [prefilled: held for the
transfer (prefill role) | joining -> decoding] -> finished; preemption sends prefilling or
decoding requests back to waiting.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Protocol

from cluster.control.routing import WorkerLoad, worker_id_key
from cluster.tools.sim.model import StepTimeModel
from cluster.tools.sim.request import SimRequest, cdiv


class SimHost(Protocol):
    """What an instance needs of the simulator driving it (cluster.tools.sim.simulator
    implements it; the protocol keeps this module from importing that one)."""

    model: StepTimeModel
    macro_max_steps: int

    def step_time(self, prefill_tokens: int, quad: int, num_decode: int, ctx_sum: int) -> float: ...
    def schedule_step_end(self, t: float, inst: Instance) -> None: ...
    def itl_sample(self, dt: float, weight: float) -> None: ...
    def on_finished(self, req: SimRequest, now: float) -> None: ...
    def on_reserved(self, req: SimRequest, now: float) -> None: ...


class Instance:
    """A simulated worker. ``role`` is its configured pool role ("prefill" | "decode" | "mixed").

    The load attributes carry WorkerLoad's field names, so routing keys read them directly.
    """

    def __init__(
        self, idx: int, worker_id: str, role: str, num_blocks: int, block_size: int, budget: int, max_seqs: int
    ):
        self.idx, self.worker_id, self.role = idx, worker_id, role
        self.id_key = worker_id_key(worker_id)
        self.total_kv_blocks = num_blocks
        self.free_kv_blocks = num_blocks
        self.block_size, self.budget, self.max_seqs = block_size, budget, max_seqs
        self.pending_requests = 0  # unfinished requests here (a prefill: until prefilled)
        self.pending_prompt_tokens = 0  # prompt tokens of waiting + prefilling requests
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []
        self.order: dict[int, SimRequest] = {}  # running (prefilling + decoding), oldest first
        self.reserve_q: deque[SimRequest] = deque()  # incoming transfers waiting for blocks
        self.n_dec = 0  # decoding requests (joined)
        self.ctx_sum = 0  # sum of their computed tokens
        self.phase_counts = [0] * block_size
        self.finish_heap: list[tuple[int, int, int, SimRequest]] = []  # (last step, idx, gen, req)
        self.joined_next: list[SimRequest] = []  # join at the next step start
        self.joined_cur: list[SimRequest] = []  # joined in the step in flight
        self.step_idx = 0  # index of the (first) step in flight, else of the next one
        self.busy = False
        self.token = 0  # bumped when a scheduled step end is replaced (interrupt)
        self.cur_chunks: list[tuple[SimRequest, int]] = []
        self.cur_dec = 0
        self.cur_steps = 1  # steps in the run in flight (> 1: a macro-step)
        self.cur_x0 = 0.0  # mean decode context in its first step
        self.cur_start = 0.0
        self.last_step_end = 0.0
        self.link_free = 0.0  # egress link of a prefill instance: busy until then
        self.held_blocks = 0  # blocks of prefilled requests waiting for their transfer
        self.num_steps = 0
        self.busy_s = 0.0
        self.dirty: set[int] = set()  # the routing index's set of changed instances (shared)

    # ------------------------------------------------------------------ load view
    @property
    def running_requests(self) -> int:
        return len(self.order)

    @property
    def free_kv_fraction(self) -> float:
        return self.free_kv_blocks / self.total_kv_blocks

    def load(self) -> WorkerLoad:
        return WorkerLoad(
            worker_id=self.worker_id,
            role=self.role,
            pending_requests=self.pending_requests,
            pending_prompt_tokens=self.pending_prompt_tokens,
            running_requests=len(self.order),
            free_kv_blocks=self.free_kv_blocks,
            total_kv_blocks=self.total_kv_blocks,
        )

    # ------------------------------------------------------------------ arrivals
    def enqueue_prefill(self, req: SimRequest, sim: SimHost, now: float) -> None:
        """Prompt to compute here (SPLIT on a prefill instance, or local prefill)."""
        self.pending_requests += 1
        self.pending_prompt_tokens += req.target
        self.waiting.append(req)
        self._wake(sim, now)

    def enqueue_reservation(self, req: SimRequest, sim: SimHost, now: float) -> None:
        """KV of ``req`` will arrive here: reserve blocks for the prompt (FIFO when full)."""
        self.pending_requests += 1
        self.reserve_q.append(req)
        if len(self.reserve_q) > 1 or cdiv(req.prompt, self.block_size) > self.free_kv_blocks:
            # a macro-step in flight holds the growth blocks of its later steps: give back
            # those of steps not started yet, as step by step they would still be free
            self.interrupt(sim, now)
        self.drain_reservations(sim, now)
        self.dirty.add(self.idx)

    def drain_reservations(self, sim: SimHost, now: float) -> None:
        q = self.reserve_q
        while q:
            req = q[0]
            if req.cancelled:
                q.popleft()
                continue
            need = cdiv(req.prompt, self.block_size)
            if need > self.free_kv_blocks:
                return
            q.popleft()
            self.free_kv_blocks -= need
            req.reserved = need
            req.t_reserved = now
            sim.on_reserved(req, now)

    def cancel_reservation(self, req: SimRequest, sim: SimHost, now: float) -> None:
        """The request ended at its prefill (one output token): drop its reservation here."""
        req.cancelled = True
        self.pending_requests -= 1
        if req.t_reserved >= 0:
            self.free_kv_blocks += req.reserved
            req.reserved = 0
        self.drain_reservations(sim, now)
        self._wake(sim, now)

    def admit_transferred(self, req: SimRequest, sim: SimHost, now: float) -> None:
        """Its KV has arrived (blocks were reserved): it decodes from the next step."""
        self.interrupt(sim, now)
        req.computed = req.prompt
        req.blocks, req.reserved = req.reserved, 0
        self.order[req.idx] = req
        self._join(req)
        self._wake(sim, now)

    def release_held(self, req: SimRequest, sim: SimHost, now: float) -> None:
        """Prefill role: the transfer is done, free the request's blocks here."""
        self.free_kv_blocks += req.blocks
        self.held_blocks -= req.blocks
        req.blocks = 0
        self._wake(sim, now)

    def _wake(self, sim: SimHost, now: float) -> None:
        """State changed: start a step if idle, else cut a macro-step after the step in flight."""
        self.dirty.add(self.idx)
        if not self.busy:
            self.start_step(sim, now)
        else:
            self.interrupt(sim, now)

    # ------------------------------------------------------------------ decode set
    def _join(self, req: SimRequest) -> None:
        s = self.step_idx + self.cur_steps if self.busy else self.step_idx
        req.dec_start = s
        req.comp0 = req.computed
        req.phase = (s - req.computed) % self.block_size
        req.pending_join = True
        self.joined_next.append(req)
        heapq.heappush(self.finish_heap, (s + req.output - req.generated - 1, req.idx, req.gen, req))

    def _growth(self, first: int, steps: int) -> int:
        """Blocks the decoding requests take in steps ``first .. first + steps - 1``."""
        bs, pc = self.block_size, self.phase_counts
        cycles, rem = divmod(steps, bs)
        if not rem:
            return cycles * self.n_dec
        a = first % bs
        b = a + rem
        part = sum(pc[a:b]) if b <= bs else sum(pc[a:]) + sum(pc[: b - bs])
        return cycles * self.n_dec + part

    def _run_length(self, sim: SimHost) -> int:
        """Steps of a macro-step from ``step_idx`` (its first step's blocks already taken):
        up to the next finish, at most ``macro_max_steps``, and while growth blocks last."""
        heap = self.finish_heap
        while heap[0][2] != heap[0][3].gen:
            heapq.heappop(heap)  # stale entries of preempted requests
        k = min(heap[0][0] - self.step_idx + 1, sim.macro_max_steps)
        if k <= 1:
            return 1
        if self._growth(self.step_idx + 1, k - 1) <= self.free_kv_blocks:
            return k
        # memory-bound: whole block-size cycles first, then step by step
        bs, pc, first = self.block_size, self.phase_counts, self.step_idx + 1
        cycles = min((k - 1) // bs, self.free_kv_blocks // self.n_dec)
        used, extra = cycles * self.n_dec, cycles * bs
        while extra < k - 1 and used + pc[(first + extra) % bs] <= self.free_kv_blocks:
            used += pc[(first + extra) % bs]
            extra += 1
        return 1 + extra

    # ------------------------------------------------------------------ stepping
    def start_step(self, sim: SimHost, now: float) -> None:
        """Schedule the next step (or macro-step) at ``now`` if anything can run (instance idle)."""
        if not (self.n_dec or self.joined_next or self.prefilling or self.waiting):
            return
        bs = self.block_size
        if self.joined_next:
            for req in self.joined_next:
                req.pending_join = False
                req.decoding = True
                self.n_dec += 1
                self.ctx_sum += req.comp0
                self.phase_counts[req.phase] += 1
            self.joined_cur, self.joined_next = self.joined_next, []
        elif self.joined_cur:
            self.joined_cur = []
        preempted = False
        need = self.phase_counts[self.step_idx % bs] if self.n_dec else 0
        while need > self.free_kv_blocks:
            self._preempt(self._newest(), sim)
            preempted = True
            need = self.phase_counts[self.step_idx % bs] if self.n_dec else 0
        self.free_kv_blocks -= need
        n_dec = self.n_dec
        budget = self.budget - n_dec
        chunks: list[tuple[SimRequest, int]] = []
        quad = 0
        i = 0
        while i < len(self.prefilling) and budget > 0:
            req = self.prefilling[i]
            n = min(req.target - req.computed, budget)
            extra = cdiv(req.computed + n, bs) - req.blocks
            while extra > self.free_kv_blocks:
                # the newest partial prefill gives way (decoders were already scheduled)
                victim = self.prefilling[-1]
                self._preempt(victim, sim)
                preempted = True
                if victim is req:
                    break
            else:
                self.free_kv_blocks -= extra
                req.blocks += extra
                chunks.append((req, n))
                quad += n * n + 2 * n * req.computed
                budget -= n
                i += 1
        if not preempted:
            w = self.waiting
            while w and budget > 0 and len(self.order) < self.max_seqs:
                req = w[0]
                n = min(req.target - req.computed, budget)
                extra = cdiv(req.computed + n, bs) - req.blocks
                if extra > self.free_kv_blocks:
                    break
                w.popleft()
                self.free_kv_blocks -= extra
                req.blocks += extra
                self.order[req.idx] = req
                self.prefilling.append(req)
                if req.t_prefill_start < 0:
                    req.t_prefill_start = now
                chunks.append((req, n))
                quad += n * n + 2 * n * req.computed
                budget -= n
        if not chunks and not n_dec:
            if preempted:
                self.dirty.add(self.idx)
            return  # idle: nothing runnable (or waiting for memory)
        steps = 1
        # a macro-step holds the growth blocks of its later steps, so it runs only while nobody
        # waits for blocks (a waiting prompt or KV reservation could get them step by step)
        if not chunks and not self.joined_cur and not self.waiting and not self.reserve_q and sim.macro_max_steps > 1:
            steps = self._run_length(sim)
        if steps > 1:
            self.cur_x0 = self.ctx_sum / n_dec + 1
            self.free_kv_blocks -= self._growth(self.step_idx + 1, steps - 1)
            dt = sim.model.decode_run(n_dec, self.cur_x0, steps)
        else:
            dt = sim.step_time(self.budget - n_dec - budget, quad, n_dec, self.ctx_sum + n_dec)
        self.busy = True
        self.cur_chunks, self.cur_dec, self.cur_start, self.cur_steps = chunks, n_dec, now, steps
        sim.schedule_step_end(now + dt, self)
        self.dirty.add(self.idx)

    def interrupt(self, sim: SimHost, now: float) -> None:
        """Cut a macro-step in flight after the step running at ``now``."""
        if not self.busy or self.cur_steps == 1:
            return
        model, n_dec, x0, steps = sim.model, self.cur_dec, self.cur_x0, self.cur_steps
        keep = min(steps, model.decode_steps_within(n_dec, x0, steps, now - self.cur_start) + 1)
        if keep == steps:
            return
        self.free_kv_blocks += self._growth(self.step_idx + keep, steps - keep)
        self.cur_steps = keep
        self.token += 1  # the scheduled end is stale now
        sim.schedule_step_end(self.cur_start + model.decode_run(n_dec, x0, keep), self)
        self.dirty.add(self.idx)

    def end_step(self, sim: SimHost, now: float) -> None:
        steps = self.cur_steps
        k_last = self.step_idx + steps - 1
        bs = self.block_size
        dt = now - self.cur_start
        self.num_steps += steps
        self.busy_s += dt
        n_dec = self.cur_dec
        if n_dec:
            joined = self.joined_cur
            if steps > 1:  # no joiners in a macro-step
                half = n_dec * steps / 2
                sim.itl_sample(sim.model.decode(n_dec, self.cur_x0), half)
                sim.itl_sample(sim.model.decode(n_dec, self.cur_x0 + steps - 1), half)
            else:
                for req in joined:
                    if req.t_second < 0:
                        req.t_second = now
                    sim.itl_sample(now - req.t_last, 1)
                if n_dec > len(joined):
                    sim.itl_sample(dt, n_dec - len(joined))
            self.ctx_sum += n_dec * steps
            heap = self.finish_heap
            while heap and heap[0][0] <= k_last:
                _, _, gen, req = heapq.heappop(heap)
                if gen != req.gen:
                    continue  # preempted since: stale entry
                final = req.comp0 + k_last - req.dec_start + 1
                req.computed = final
                self.n_dec -= 1
                self.ctx_sum -= final
                self.phase_counts[req.phase] -= 1
                self.free_kv_blocks += cdiv(final, bs)
                req.blocks = 0
                req.decoding = False
                req.generated = req.output
                req.t_last = now
                del self.order[req.idx]
                self.pending_requests -= 1
                sim.on_finished(req, now)
            for req in joined:
                req.t_last = now
        self.step_idx = k_last + 1
        self.busy = False
        self.cur_steps = 1
        self.last_step_end = now
        for req, n in self.cur_chunks:
            self._chunk_done(req, n, sim, now)
        self.cur_chunks = []
        if self.reserve_q:
            self.drain_reservations(sim, now)
        self.dirty.add(self.idx)
        self.start_step(sim, now)

    def _chunk_done(self, req: SimRequest, n: int, sim: SimHost, now: float) -> None:
        req.computed += n
        req.last_chunk = n
        self.pending_prompt_tokens -= n
        if req.computed < req.target:
            return
        self.prefilling.remove(req)
        req.generated += 1
        if req.generated == 1:
            req.t_first = now
        else:
            sim.itl_sample(now - req.t_last, 1)  # the token sampled after a recompute
        req.t_last = now
        if req.generated >= req.output:
            self.free_kv_blocks += req.blocks
            req.blocks = 0
            del self.order[req.idx]
            self.pending_requests -= 1
            sim.on_finished(req, now)
        elif self.role == "prefill":
            del self.order[req.idx]  # prefilled: blocks held until the transfer is done
            self.held_blocks += req.blocks
            self.pending_requests -= 1
            req.t_prefilled = now
            sim.on_prefilled(req, now)
        else:
            self._join(req)

    # ------------------------------------------------------------------ preemption
    def _newest(self) -> SimRequest:
        return self.order[next(reversed(self.order))]

    def _preempt(self, req: SimRequest, sim: SimHost) -> None:
        """Free ``req``'s blocks and re-queue it at the front to recompute (at a step start)."""
        assert not self.busy and not req.pending_join, "preemption happens only while scheduling a step"
        del self.order[req.idx]
        if req.decoding:
            computed = req.comp0 + self.step_idx - req.dec_start
            self.n_dec -= 1
            self.ctx_sum -= computed
            self.phase_counts[req.phase] -= 1
            self.free_kv_blocks += cdiv(computed, self.block_size)
            if req in self.joined_cur:
                self.joined_cur.remove(req)  # never stepped: its last token time stands
            else:
                req.t_last = self.last_step_end  # decoders step together: its last token
            req.generated += self.step_idx - req.dec_start
            req.decoding = False
        else:  # partially prefilled
            self.prefilling.remove(req)
            self.free_kv_blocks += req.blocks
            self.pending_prompt_tokens -= req.target - req.computed
        req.gen += 1
        req.blocks = 0
        req.computed = 0
        req.target = req.prompt + req.generated
        req.preemptions += 1
        self.pending_prompt_tokens += req.target
        self.waiting.appendleft(req)
        sim.num_preemptions += 1
