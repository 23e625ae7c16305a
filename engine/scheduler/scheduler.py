"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption.

``schedule()`` decides and returns data (SchedulerOutput); ``update()`` applies the sampled
tokens. Running requests are served first (oldest first), then waiting ones while the token
budget, ``max_num_seqs`` and free blocks allow. When a running request cannot get a block,
the newest running request is preempted by recompute: its blocks are freed and it goes back
to the front of the waiting queue with ``num_computed_tokens = 0``. With a partitioned KV
manager (attention offload: one pool per attention shard) the victim is the newest running
request in the same partition (``KVCacheManager.shares_pool``), and a request alone in its
full partition finishes with LENGTH as one alone in a full pool does.

Speculative decoding: a running request at its decode step (one uncomputed token) whose
``draft_token_ids`` the engine set is scheduled with up to k of them after that token (within
the token budget; dropped, never preempting anyone, when the blocks for them are missing).

Modes (SchedulerConfig.mode):
- mixed: prompts and decodes in one engine;
- prefill_only: a request whose prompt completes becomes PREFILLED with its first token and
  keeps its blocks until ``release()`` (after the KV transfer);
- decode_only: requests arrive with KV computed elsewhere: ``reserve()`` blocks, receive
  the bytes into them, then ``admit()`` with the first token. Preempted ones are recomputed
  locally like in mixed mode.
"""

from __future__ import annotations

from collections import deque

from engine.config import CacheConfig, SchedulerConfig, SchedulerMode
from engine.kv_cache.manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from engine.scheduler.output import ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig, kv: KVCacheManager):
        self.config = config
        self.cache_config = cache_config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilled: dict[str, Request] = {}  # prefill_only: done, blocks held for transfer
        self.reserved: dict[str, Request] = {}  # decode_only: blocks reserved, KV in flight
        self.num_preemptions = 0
        # finished by schedule() itself (context outgrew the pool); reported by the next update
        self._finished_in_schedule: list[Request] = []

    # ---------------------------------------------------------------- admission
    def add_request(self, req: Request) -> None:
        """Queue a prompt. Raises ValueError for a request that could never run."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self._check_fits(req, req.num_tokens + 1)
        if not self.config.enable_chunked_prefill and req.num_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt of {req.num_tokens} tokens exceeds max_num_batched_tokens "
                f"{self.config.max_num_batched_tokens} and chunked prefill is disabled"
            )
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def reserve(self, req: Request, partition: int | None = None) -> list[int] | None:
        """decode_only: take blocks for the prompt's KV before it arrives (None: no room now);
        ``partition``: of a partitioned pool (KVCacheManager.reserve)."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self._check_fits(req, req.num_tokens + 1)
        blocks = self.kv.reserve(req.request_id, req.num_tokens, partition)
        if blocks is not None:
            self.requests[req.request_id] = req
            self.reserved[req.request_id] = req
        return blocks

    def admit(self, request_id: str, first_token: int) -> Request:
        """decode_only: the reserved request's prompt KV has arrived; start decoding it."""
        req = self.reserved.pop(request_id)
        req.num_computed_tokens = len(req.prompt_token_ids)
        req.num_cached_tokens = max(req.num_cached_tokens, 0)
        self.kv.cache_full_blocks(req)
        reason = req.append_token(first_token)
        if reason is not None:
            self._finish(req, reason)
        else:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return req

    def _check_fits(self, req: Request, tokens: int) -> None:
        if not req.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        need = self.kv.blocks_needed(tokens)
        if need > self.kv.max_blocks_per_request:
            raise ValueError(
                f"request needs {need} KV blocks for {tokens} tokens but the cache has {self.kv.max_blocks_per_request}"
            )

    # ---------------------------------------------------------------- scheduling
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            # draft tokens ride on a pure decode entry (its one uncomputed token), within budget
            k = min(len(req.draft_token_ids), budget - n) if req.draft_token_ids and n == 1 else 0
            while not self.kv.allocate(req, n + k):
                if k:  # drop the drafts before preempting anyone
                    k = 0
                    continue
                victim = self.running.pop(self._newest_competitor(req))
                if victim is req and not self._others_hold_blocks_near(req):
                    # alone and still no room: the pool cannot hold this context at all
                    self._finish(req, FinishReason.LENGTH)
                    self._finished_in_schedule.append(req)
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(self._entry(req, n, k))
                budget -= n + k
                i += 1
        if not preempted:
            budget = self._schedule_waiting(budget, scheduled)
        return SchedulerOutput(scheduled=scheduled, preempted=preempted)

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            prefix = self.kv.computed_prefix(req) if req.num_computed_tokens == 0 else None
            cached = len(prefix[0]) * self.kv.block_size if prefix else req.num_computed_tokens
            remaining = req.num_tokens - cached
            # Without chunked prefill a prompt waits for a step with room for all of it. A
            # preempted request may have grown past the whole budget: it never fits, so its
            # recompute is chunked anyway (otherwise it blocks the queue forever).
            whole_only = not self.config.enable_chunked_prefill and remaining <= self.config.max_num_batched_tokens
            if remaining > budget and whole_only:
                break
            n = min(remaining, budget)
            if not self.kv.allocate(req, n, prefix):
                break
            self.waiting.popleft()
            req.num_computed_tokens = cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._entry(req, n))
            budget -= n
        return budget

    def _newest_competitor(self, req: Request) -> int:
        """Index in ``running`` of the preemption victim for ``req``: the newest running request
        whose blocks ``req`` could use (one pool: the newest running request; ``req`` itself at
        worst, and never one older than ``req``, which is already scheduled this step)."""
        for j in range(len(self.running) - 1, -1, -1):
            r = self.running[j]
            if r is req or self.kv.shares_pool(r.request_id, req.request_id):
                return j
        raise RuntimeError(f"request {req.request_id!r} is not running")

    def _others_hold_blocks_near(self, req: Request) -> bool:
        """Whether any other request holds blocks ``req`` could get once they are freed."""
        rid = req.request_id
        return any(
            self.kv.shares_pool(r.request_id, rid)
            for r in (*self.running, *self.prefilled.values(), *self.reserved.values())
            if r is not req
        )

    def _entry(self, req: Request, n: int, num_drafts: int = 0) -> ScheduledRequest:
        start = req.num_computed_tokens
        tokens = req.all_token_ids[start : start + n]
        if num_drafts:
            tokens += req.draft_token_ids[:num_drafts]
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=tokens,
            start_pos=start,
            block_ids=list(self.kv.block_ids(req.request_id)),
            sample=start + n == req.num_tokens,
            params=req.params,
            num_output_tokens=len(req.output_token_ids),
            num_draft_tokens=num_drafts,
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---------------------------------------------------------------- update
    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Apply one step's results; returns the requests that gained tokens or finished.

        ``sampled[request_id]`` lists the tokens emitted for the request this step: one for a
        plain entry; for an entry with k draft tokens the m accepted drafts and one more token
        (1 <= m + 1 <= k + 1). The K/V of the rejected drafts' slots is rolled back: the
        request's computed tokens grow by 1 + m, blocks past them are freed, and only then
        are full blocks hashed (a block holding a rejected draft's K/V is never cached).
        """
        changed = self.take_finished_in_schedule()
        for sr in output.scheduled:
            req = self.requests.get(sr.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            if sr.num_draft_tokens:
                self._update_speculative(req, sr, sampled[sr.request_id])
                changed.append(req)
                continue
            req.num_computed_tokens += sr.num_tokens
            self.kv.cache_full_blocks(req)
            if not sr.sample:
                continue
            changed.append(req)
            for tok in sampled[sr.request_id]:
                reason = req.append_token(tok)
                if reason is not None:
                    self._finish(req, reason)
                    break
            else:
                if self.config.mode == SchedulerMode.PREFILL_ONLY:
                    self._to_prefilled(req)
        return changed

    def _update_speculative(self, req: Request, sr: ScheduledRequest, tokens: list[int]) -> None:
        accepted = len(tokens) - 1
        if not 0 <= accepted <= sr.num_draft_tokens:
            raise ValueError(
                f"request {sr.request_id!r}: {len(tokens)} tokens emitted for {sr.num_draft_tokens} draft tokens"
            )
        for tok in tokens:  # appended first: the accepted drafts' ids are what gets hashed below
            reason = req.append_token(tok)
            if reason is not None:
                self._finish(req, reason)  # frees every block, rejected slots included
                return
        # the last known token and the accepted drafts now have K/V; the emitted last token not
        req.num_computed_tokens += sr.num_tokens - sr.num_draft_tokens + accepted
        self.kv.truncate(req.request_id, req.num_tokens)
        self.kv.cache_full_blocks(req)

    def take_finished_in_schedule(self) -> list[Request]:
        """Requests schedule() finished (LENGTH at pool capacity) since the last call."""
        done, self._finished_in_schedule = self._finished_in_schedule, []
        return done

    def _to_prefilled(self, req: Request) -> None:
        self.running.remove(req)
        req.status = RequestStatus.PREFILLED
        self.prefilled[req.request_id] = req

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
        self.prefilled.pop(req.request_id, None)
        self.reserved.pop(req.request_id, None)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.kv.free(req.request_id)
        del self.requests[req.request_id]

    def release(self, request_id: str) -> Request:
        """prefill_only: the request's KV has been sent; free its blocks."""
        req = self.prefilled[request_id]
        self._finish(req, FinishReason.STOP if req.finish_reason is None else req.finish_reason)
        return req

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request wherever it is; its blocks are freed. None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, FinishReason.ABORT)
        return req

    # ---------------------------------------------------------------- queries
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)
