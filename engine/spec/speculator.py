"""Speculator: the engine step's speculative decoding, one per EngineCore (colocated).

It composes a proposer (n-gram or draft model, engine/spec/proposer.py), a speculation-length
policy (SmartSpec or fixed, engine/spec/smartspec.py) and the verifier (engine/spec/verify.py).
Per engine step (EngineCore._speculative_step):

    propose(running)    before schedule(): for every running request at its decode step
                        (exactly one uncomputed token) that allows speculation, the policy
                        chooses k (0..K) and the proposer fills ``Request.draft_token_ids``
    schedule()          schedules 1 + k' tokens per such request (k' <= k: the token budget
                        or missing blocks may trim or drop drafts; never a preemption)
    verify(out, logits) the target's logits of the k' + 1 rows of each entry -> the emitted
                        tokens (greedy: argmax; temperature > 0: rejection sampling) and the
                        target's logprobs of them
    update()            the scheduler appends them and rolls the rejected slots back
    end_step(out, s)    the proposer learns m (``on_accepted``; a dropped proposal counts
                        m = 0), the policy observes acceptance and the step's time, and every
                        request's drafts are cleared
    forget / preempted  a request left (finish, abort) or lost its KV (preemption): the
                        proposer drops its state (a draft model frees its blocks)

Invariant between steps: no request holds draft tokens, and the proposer has been told the
outcome of every proposal it made.

Proposer faults (a draft worker fault fails over to no speculation, never to a wrong token):
an exception raised by the proposer (``propose``, the draft model's forward or its KV
bookkeeping in ``on_accepted`` / ``release``), or a proposal longer than asked, is a *fault*:

    the step       no request of it holds draft tokens, so schedule() gives each one token
                   and the target's normal single-token path runs (k = 0 for everyone); the
                   emitted tokens are the target's own, as without speculation
    its state      every request the faulting call touched is released from the proposer
                   (a draft model frees its pages; its next proposal recomputes the draft KV
                   from scratch), so a half-written draft KV never survives and no block leaks
    counted        ``SpecStats.proposer_faults`` (splitserve_spec_proposer_faults_total); the
                   first fault is logged with its traceback, later ones in one line
    disabled       after MAX_CONSECUTIVE_FAULTS faults with no successful proposing step in
                   between (or a release that itself fails: the proposer's state cannot be
                   trusted), the proposer is released of every request it holds and never
                   called again for this engine's life (``SpecStats.proposer_disabled``);
                   every step then runs without speculation
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from engine.config import SpeculativeConfig
from engine.request import Request, RequestStatus, TokenLogprobs
from engine.scheduler.output import SchedulerOutput
from engine.spec.draft import DraftKVUsage, DraftProposer
from engine.spec.proposer import EMPTY_PROPOSAL, Proposal, ProposalInput, Proposer
from engine.spec.smartspec import (
    SpecCandidate,
    SpecStep,
    SpeculationPolicy,
    StepFeatures,
    attention_work,
    make_policy,
)
from engine.spec.verify import VerifyInput, verify

log = logging.getLogger(__name__)

# proposer faults with no successful proposing step in between before the proposer is
# disabled for the engine's life
MAX_CONSECUTIVE_FAULTS = 3


@dataclass(frozen=True)
class SpecStats:
    """Cumulative speculative-decoding counters of one engine since start.

    proposed_tokens: draft tokens verified by the target (scheduled; vLLM's "draft tokens").
    accepted_tokens: of those, accepted.
    dropped_tokens: draft tokens proposed but not verified (token budget, no KV blocks,
        preemption, a request that left).
    verified_requests: request-steps that verified at least one draft token.
    emitted_tokens: tokens those request-steps emitted (accepted + one each).
    speculative_steps: engine steps that verified at least one draft token.
    k_counts: chosen-k histogram of the policy, index k in 0..K (one count per candidate
        request per step).
    draft_kv: the draft model's own KV pool (None for the n-gram proposer).
    proposer_faults: proposer calls that raised (or returned a malformed proposal); each
        one's step ran without speculation.
    proposer_disabled: the proposer was turned off for the engine's life after repeated
        faults; every step since runs without speculation.
    """

    method: str
    policy: str
    proposed_tokens: int
    accepted_tokens: int
    dropped_tokens: int
    verified_requests: int
    emitted_tokens: int
    speculative_steps: int
    k_counts: list[int]
    draft_kv: DraftKVUsage | None
    proposer_faults: int
    proposer_disabled: bool

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed draft tokens (0 before any was verified)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying request-step (1 = nothing gained)."""
        return self.emitted_tokens / self.verified_requests if self.verified_requests else 0.0


@dataclass
class _Counters:
    proposed: int = 0
    accepted: int = 0
    dropped: int = 0
    verified: int = 0
    emitted: int = 0
    steps: int = 0
    faults: int = 0
    pending: dict[str, Proposal] = field(default_factory=dict)  # this step's proposals


class ProposerFault(RuntimeError):
    """A proposer returned something it must not (the exception a malformed proposal is
    counted as; an exception the proposer raises itself is counted as it is)."""


class Speculator:
    """See the module docstring. ``max_model_len`` caps draft positions; the proposer and
    policy are built by ``make_speculator`` (or injected by tests)."""

    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: Proposer,
        policy: SpeculationPolicy,
        max_model_len: int,
        max_num_batched_tokens: int,
    ):
        self.config = config
        self.proposer = proposer
        self.policy = policy
        self.K = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        # a draft model pays one sequential forward per draft round; n-gram lookup nothing
        self._drafts_cost_rounds = isinstance(proposer, DraftProposer)
        self._c = _Counters()
        self._verified: dict[str, tuple[int, int]] = {}  # id -> (k verified, m accepted) this step
        # fault bookkeeping (module docstring): ids the proposer may hold state for (given to
        # propose, not yet released), faults since the last step whose proposing succeeded
        self._held: set[str] = set()
        self._consecutive_faults = 0
        self._step_faulted = False
        self._step_proposed = False
        self.disabled = False

    # ------------------------------------------------------------ before schedule
    def _cap(self, req: Request) -> int:
        """The most drafts ``req`` may verify now: K, its remaining output minus the one
        token every step emits, and the context room (draft j sits at num_tokens - 1 + j)."""
        p = req.params
        left = p.max_tokens - len(req.output_token_ids) - 1
        room = self.max_model_len - req.num_tokens
        return max(0, min(self.K, left, room))

    def propose(self, running: Sequence[Request], pending_prompt_tokens: int) -> None:
        """Choose k and set ``draft_token_ids`` for the running requests at their decode step.
        A proposer fault leaves every request without drafts (module docstring)."""
        if self.disabled:
            return
        reqs = [
            r
            for r in running
            if r.status == RequestStatus.RUNNING
            and r.num_computed_tokens == r.num_tokens - 1
            and r.params.allow_speculation
        ]
        if not reqs:
            return
        caps = {r.request_id: self._cap(r) for r in reqs}
        inputs = {
            r.request_id: ProposalInput(r.request_id, r.all_token_ids, len(r.prompt_token_ids), r.params)
            for r in reqs
            if caps[r.request_id] > 0
        }
        looked_up: dict[str, Proposal] = {}
        if not self._drafts_cost_rounds and inputs:
            # cheap deterministic lookup first: the policy then knows each proposal's length
            lookup_caps = {rid: caps[rid] for rid in inputs}
            got = self._call_propose(list(inputs.values()), lookup_caps)
            if got is None:
                return
            looked_up = got
            for rid, prop in looked_up.items():
                caps[rid] = min(caps[rid], len(prop))
        step = SpecStep(
            candidates=[
                SpecCandidate(r.request_id, self.proposer.name, r.num_tokens, caps[r.request_id]) for r in reqs
            ],
            base_tokens=min(pending_prompt_tokens, max(0, self.max_num_batched_tokens - len(reqs))),
        )
        chosen = self.policy.choose(step)
        want = {rid: k for rid, k in chosen.items() if k > 0}
        if not want:
            for rid, prop in looked_up.items():
                if len(prop):
                    self._tell_accepted(rid, 0)  # looked up, not used
            return
        if self._drafts_cost_rounds:
            got = self._call_propose([inputs[rid] for rid in want], want)
            if got is None:
                return
            props = got
        else:
            props = {rid: _head(looked_up[rid], want.get(rid, 0)) for rid in looked_up}
        by_id = {r.request_id: r for r in reqs}
        for rid, prop in props.items():
            if len(prop) == 0:
                if rid in looked_up and len(looked_up[rid]):
                    self._tell_accepted(rid, 0)
                continue
            by_id[rid].draft_token_ids = list(prop.token_ids)
            self._c.pending[rid] = prop

    def _call_propose(self, inputs: list[ProposalInput], k: dict[str, int]) -> dict[str, Proposal] | None:
        """proposer.propose, checked: None after a fault (counted; the inputs' proposer state
        released), else an entry of at most k[id] tokens for every input."""
        ids = [inp.request_id for inp in inputs]
        self._held.update(ids)
        try:
            got = self.proposer.propose(inputs, k)
            for rid in ids:
                if rid not in got:
                    raise ProposerFault(f"proposer {self.proposer.name!r} returned no proposal for {rid!r}")
                if len(got[rid]) > k.get(rid, 0):
                    raise ProposerFault(
                        f"proposer {self.proposer.name!r} proposed {len(got[rid])} tokens for {rid!r}, "
                        f"asked for at most {k.get(rid, 0)}"
                    )
        except Exception as e:  # noqa: BLE001 - any proposer fault fails over to no speculation
            self._fault("propose", e, ids)
            return None
        self._step_proposed = True
        return got

    def _tell_accepted(self, request_id: str, num_accepted: int) -> None:
        try:
            self.proposer.on_accepted(request_id, num_accepted)
        except Exception as e:  # noqa: BLE001 - the draft's rollback failed: drop its state
            self._fault("on_accepted", e, [request_id])

    def _release(self, request_id: str) -> None:
        self._held.discard(request_id)
        try:
            self.proposer.release(request_id)
        except Exception as e:  # noqa: BLE001 - its state (and draft blocks) cannot be trusted
            self._count_fault("release", e)
            self._disable(f"release of {request_id!r} failed: {e!r}")

    def _count_fault(self, where: str, exc: BaseException) -> None:
        self._c.faults += 1
        self._consecutive_faults += 1
        self._step_faulted = True
        name = self.proposer.name
        if self._c.faults == 1:
            log.error(
                "speculation: proposer %r faulted in %s; this step runs without speculation", name, where, exc_info=exc
            )
        else:
            log.warning("speculation: proposer %r fault %d in %s: %r", name, self._c.faults, where, exc)

    def _fault(self, where: str, exc: BaseException, request_ids: Iterable[str]) -> None:
        """A proposer call raised: count it, drop the touched requests' proposer state (a
        draft's half-written KV), and disable the proposer after repeated faults."""
        self._count_fault(where, exc)
        for rid in request_ids:
            self._c.pending.pop(rid, None)
            if not self.disabled:
                self._release(rid)
        if not self.disabled and self._consecutive_faults >= MAX_CONSECUTIVE_FAULTS:
            self._disable(f"{self._consecutive_faults} faults in a row")

    def _disable(self, why: str) -> None:
        """Turn the proposer off for the engine's life; release everything it holds."""
        if self.disabled:
            return
        self.disabled = True
        log.error(
            "speculation: proposer %r disabled (%s); decoding continues without speculation", self.proposer.name, why
        )
        held, self._held = list(self._held), set()
        for rid in held:
            try:
                self.proposer.release(rid)
            except Exception as e:  # noqa: BLE001 - nothing more can be done; it is never called again
                log.warning("speculation: releasing %r from the disabled proposer failed: %r", rid, e)

    # ------------------------------------------------------------ after the forward
    def verify(
        self, out: SchedulerOutput, logits: torch.Tensor
    ) -> tuple[dict[str, list[int]], dict[str, list[TokenLogprobs]]]:
        """logits: [sum over sample entries of (k_i + 1), V] (ModelRunner.score) -> emitted
        tokens and, for requests asking for them, the target's logprobs of each."""
        sampling = [s for s in out.scheduled if s.sample]
        inputs = []
        for s in sampling:
            k = s.num_draft_tokens
            prop = self._c.pending.get(s.request_id)
            probs = None if prop is None or prop.probs is None or k == 0 else prop.probs[:k]
            inputs.append(
                VerifyInput(s.token_ids[len(s.token_ids) - k :] if k else [], s.params, s.num_output_tokens, probs)
            )
        results = verify(logits, inputs)
        sampled, logprobs = {}, {}
        for s, res in zip(sampling, results, strict=True):
            sampled[s.request_id] = res.token_ids
            if res.logprobs is not None:
                logprobs[s.request_id] = res.logprobs
            if s.num_draft_tokens:
                self._verified[s.request_id] = (s.num_draft_tokens, res.num_accepted)
        return sampled, logprobs

    def end_step(self, out: SchedulerOutput, running: Sequence[Request], seconds: float | None) -> None:
        """Tell the proposer and the policy how the step went; clear every request's drafts.
        ``seconds``: the step's wall time (propose to update), None when nothing ran."""
        c = self._c
        verified, self._verified = self._verified, {}
        if verified:
            c.steps += 1
        for rid, prop in list(c.pending.items()):  # a fault below pops its entry
            k, m = verified.get(rid, (0, 0))
            c.dropped += len(prop) - k
            if k:
                c.proposed += k
                c.accepted += m
                c.verified += 1
                c.emitted += m + 1
                self.policy.observe_acceptance(rid, self.proposer.name, k, m)
            self._tell_accepted(rid, m)  # harmless for a released id
        c.pending.clear()
        for r in running:
            r.draft_token_ids = []
        if self._step_proposed and not self._step_faulted:
            self._consecutive_faults = 0
        self._step_proposed = self._step_faulted = False
        if seconds is not None and out.scheduled:
            rounds = max((s.num_draft_tokens for s in out.scheduled), default=0) if self._drafts_cost_rounds else 0
            features = StepFeatures(
                num_tokens=out.num_tokens,
                num_draft_tokens=out.num_draft_tokens,
                context_tokens=sum(attention_work(s.start_pos, s.num_tokens) for s in out.scheduled),
                draft_rounds=rounds,
            )
            self.policy.observe_step(features, seconds)

    # ------------------------------------------------------------ request lifecycle
    def preempted(self, request_id: str) -> None:
        """The request lost its KV (recompute later): the proposer drops its state."""
        if not self.disabled:
            self._release(request_id)

    def forget(self, request_id: str) -> None:
        """The request finished or was aborted."""
        if not self.disabled:
            self._release(request_id)
        self.policy.release(request_id)

    def set_cluster_pressure(self, pressure: float) -> None:
        self.policy.set_cluster_pressure(pressure)

    # ------------------------------------------------------------ reports
    def stats(self) -> SpecStats:
        c = self._c
        return SpecStats(
            method=self.config.method,
            policy=self.config.policy,
            proposed_tokens=c.proposed,
            accepted_tokens=c.accepted,
            dropped_tokens=c.dropped,
            verified_requests=c.verified,
            emitted_tokens=c.emitted,
            speculative_steps=c.steps,
            k_counts=list(self.policy.k_counts),
            draft_kv=self.proposer.usage() if isinstance(self.proposer, DraftProposer) else None,
            proposer_faults=c.faults,
            proposer_disabled=self.disabled,
        )


def _head(prop: Proposal, k: int) -> Proposal:
    """The first k tokens of a proposal (k <= len)."""
    if k <= 0:
        return EMPTY_PROPOSAL
    if k >= len(prop):
        return prop
    return Proposal(prop.token_ids[:k], None if prop.probs is None else prop.probs[:k])


def make_speculator(
    config: SpeculativeConfig,
    proposer: Proposer,
    max_model_len: int,
    max_num_batched_tokens: int,
    policy: SpeculationPolicy | None = None,
) -> Speculator:
    """A Speculator with the policy ``config.policy`` names (unless one is injected)."""
    return Speculator(config, proposer, policy or make_policy(config), max_model_len, max_num_batched_tokens)
