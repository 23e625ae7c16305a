"""Speculation-length policies: SmartSpec (goodput-maximising k per request) and fixed k.

SmartSpec (Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large Language
Models Using Goodput") chooses, every step, k_i in {0..K} for each decoding request to
maximise the step's goodput: expected emitted tokens per second of step time. Three parts:

1. Acceptance (``AcceptanceTracker``): per proposer, an exponentially decayed count of
   accepted over verified draft tokens, starting from a cold-start prior (pseudo-counts); per
   request the same, shrunk towards its proposer's estimate while the request has few
   observations. A verification of k' proposed tokens with m accepted counts m successes in
   m + 1 trials when m < k' (the (m+1)-th was rejected) and k' in k' when all were accepted
   (the maximum-likelihood update for a per-token acceptance a). With acceptance a, k drafts
   emit E(k, a) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens (incl. the bonus).

2. Step time (``StepTimeModel``): seconds ~ b . [1, num_tokens, num_draft_tokens,
   context_tokens, draft_rounds] (``StepFeatures``), fitted online by least squares from the
   worker's own measured steps: no offline profile. Exponential forgetting keeps the fit local
   to the current operating point (a linearisation of the roofline around it); coefficients
   are constrained non-negative (active set), features are Jacobi-scaled and lightly ridged,
   so a feature that stopped varying (no speculation for a while) keeps its last estimate.

3. Choice (``SmartSpecPolicy.choose``): starting from k = 0 for all (each request emits one
   token in time T0 = predicted time of the plain step), the candidate increments (request i,
   its j-th draft token) gain a_i^j expected tokens and cost the time of one more verified
   row (b_tokens + b_draft + b_context * its context) plus, for draft models, one more
   sequential draft forward when j exceeds the current maximum (b_rounds). Increments are
   taken in order of gain/cost (per request this order is j = 1, 2, ..., since a^j falls) and
   the prefix with the highest goodput E / T is chosen; the empty prefix (every k = 0) is an
   ordinary outcome. So under load, when the marginal time of a verified row approaches the
   average time per emitted token, speculation switches itself off, and on again when the
   batch shrinks; high acceptance raises k, low acceptance lowers it.

   Cluster pressure p >= 0 (``set_cluster_pressure``; the router feeds queueing at the decode
   pool, e.g. queued requests / decode slots): every second of speculative work is counted
   (1 + p) seconds, T = T0 + (1 + p) * T_spec, so speculation backs off before the queue
   grows. A chosen speculation must beat k = 0 by ``min_gain`` (hysteresis against noise).

   Probing (``probe_interval`` N > 0; make_policy uses PROBE_INTERVAL): once speculation is
   off (every choice k = 0 although some candidate could speculate) the estimates that
   turned it off get no new data (no verified drafts: the acceptance and the draft-row
   coefficient freeze), so a noisy burst of step times could keep it off for good. After N
   consecutive such decisions the next one gives k = 1 to every candidate that can
   speculate: one step in N + 1 verifies one draft row per request, refreshing both.
   With a draft model (``probe_single``) a probe is not cheap: the draft's KV of a request
   falls behind while speculation is off, and its probe first catches up every token since
   the request's last draft (a batched draft forward over them; measured on SmolLM2's
   24-layer self-draft at 8 running requests: probing all of them made a step sequence
   with speculation "off" 1.35x slower than no speculation). So a draft model probes ONE
   request per probe, the one probed last while it still runs (its catch-up is the N
   tokens since then), else the first candidate that can speculate.

   Cold start: the first ``warmup_steps`` decisions cycle k through 0..K for every request
   (capped by its max_k), so the step-time fit sees speculative and plain steps before it
   decides anything.

Reproducibility: a seeded request's output depends on the sequence of k it was given
(engine/spec/verify.py); SmartSpec's k depends on load, so a seeded request under SmartSpec
is reproducible only for the same sequence of k ("fixed" always gives the same sequence).

Lifecycle, per step of the decode worker: ``choose(SpecStep)`` -> propose/verify ->
``observe_acceptance`` for every verified proposal -> ``observe_step(features, seconds)``
with the step as executed; ``release(id)`` when a request leaves. Not thread-safe: the
worker's loop thread owns it (``set_cluster_pressure`` stores one float, safe from another
thread).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine.spec.config import SpeculativeConfig

# make_policy's probe interval: at most one step in 33 verifies one draft row per request
# while speculation is off (module docstring, part 3)
PROBE_INTERVAL = 32

FEATURES = ("intercept", "num_tokens", "num_draft_tokens", "context_tokens", "draft_rounds")


def attention_work(start_pos: int, num_rows: int) -> int:
    """Context tokens a request's ``num_rows`` query rows attend to when the first sits at
    ``start_pos``: sum over rows of (position + 1) = n*s + n(n+1)/2."""
    return num_rows * start_pos + num_rows * (num_rows + 1) // 2


@dataclass(frozen=True)
class StepFeatures:
    """What one executed step cost is modelled on.

    num_tokens: rows the target computed (prompt chunks + one per decode + draft tokens).
    num_draft_tokens: draft tokens verified (sum of k_i as executed).
    context_tokens: attention work, sum over query rows of the context each attends to
        (``attention_work`` per scheduled request).
    draft_rounds: sequential draft-model forwards (max k_i; 0 for the n-gram proposer).
    """

    num_tokens: int
    num_draft_tokens: int = 0
    context_tokens: int = 0
    draft_rounds: int = 0

    def vector(self) -> np.ndarray:
        return np.array(
            [1.0, self.num_tokens, self.num_draft_tokens, self.context_tokens, self.draft_rounds], dtype=np.float64
        )


class StepTimeModel:
    """Online non-negative least squares of step seconds on ``StepFeatures`` (module docstring).

    State: A = sum w_t x_t x_t^T, b = sum w_t x_t y_t with w_t = forgetting^(age of step t).
    """

    def __init__(self, forgetting: float = 0.98, ridge: float = 1e-6):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        n = len(FEATURES)
        self.forgetting = forgetting
        self.ridge = ridge
        self._a = np.zeros((n, n))
        self._b = np.zeros(n)
        self._coef = np.zeros(n)
        self._dirty = False
        self.num_observations = 0

    def observe(self, features: StepFeatures, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"step seconds must be finite and >= 0, got {seconds}")
        x = features.vector()
        self._a *= self.forgetting
        self._b *= self.forgetting
        self._a += np.outer(x, x)
        self._b += x * seconds
        self.num_observations += 1
        self._dirty = True

    @property
    def coefficients(self) -> np.ndarray:
        """b >= 0 per feature (``FEATURES`` order), seconds per unit."""
        if self._dirty:
            self._coef = self._solve()
            self._dirty = False
        return self._coef.copy()

    def predict(self, features: StepFeatures) -> float:
        return float(self.coefficients @ features.vector())

    def _solve(self) -> np.ndarray:
        d = np.sqrt(np.diag(self._a))
        live = d > 0  # features never seen non-zero keep coefficient 0
        active = np.flatnonzero(live)
        coef = np.zeros(len(d))
        while active.size:
            dd = d[active]
            a = self._a[np.ix_(active, active)] / np.outer(dd, dd) + self.ridge * np.eye(active.size)
            sol = np.linalg.solve(a, self._b[active] / dd) / dd
            if (sol >= 0).all():
                coef[active] = sol
                break
            active = np.delete(active, int(np.argmin(sol)))  # drop the most negative, refit
        return coef


class AcceptanceTracker:
    """Per-proposer and per-request acceptance estimates (module docstring, part 1)."""

    def __init__(
        self,
        priors: Mapping[str, float],
        prior_weight: float = 8.0,
        proposer_decay: float = 0.99,
        request_decay: float = 0.8,
        request_weight: float = 4.0,
    ):
        for name, a in priors.items():
            if not 0.0 < a < 1.0:
                raise ValueError(f"acceptance prior of {name!r} must be in (0, 1), got {a}")
        self._proposer = {name: [a * prior_weight, prior_weight] for name, a in priors.items()}
        self._request: dict[str, list[float]] = {}  # id -> [successes, trials]
        self.proposer_decay = proposer_decay
        self.request_decay = request_decay
        self.request_weight = request_weight

    def proposer_estimate(self, proposer: str) -> float:
        s, n = self._counts(proposer)
        return _clip(s / n)

    def estimate(self, request_id: str, proposer: str) -> float:
        base = self.proposer_estimate(proposer)
        s, n = self._request.get(request_id, (0.0, 0.0))
        w = self.request_weight
        return _clip((s + w * base) / (n + w))

    def observe(self, request_id: str, proposer: str, num_proposed: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"accepted {num_accepted} of {num_proposed} proposed tokens")
        if num_proposed == 0:
            return
        trials = num_accepted + (1 if num_accepted < num_proposed else 0)
        p = self._counts(proposer)
        p[0] = self.proposer_decay * p[0] + num_accepted
        p[1] = self.proposer_decay * p[1] + trials
        r = self._request.setdefault(request_id, [0.0, 0.0])
        r[0] = self.request_decay * r[0] + num_accepted
        r[1] = self.request_decay * r[1] + trials

    def release(self, request_id: str) -> None:
        self._request.pop(request_id, None)

    def _counts(self, proposer: str) -> list[float]:
        if proposer not in self._proposer:
            raise KeyError(f"no acceptance prior for proposer {proposer!r} (known: {sorted(self._proposer)})")
        return self._proposer[proposer]


def _clip(a: float) -> float:
    return min(max(a, 0.01), 0.99)


def expected_tokens(k: int, a: float) -> float:
    """E[emitted tokens | k drafts, per-token acceptance a] = (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True)
class SpecCandidate:
    """A decoding request the policy may speculate for this step.

    context_len: tokens its first verified row attends to (KV + itself).
    max_k: the most drafts it may get: min(K, remaining output - 1, context room, and for
        the n-gram proposer the length of its proposal); 0 when it must not speculate
        (allow_speculation off, draft pool full).
    """

    request_id: str
    proposer: str
    context_len: int
    max_k: int


@dataclass(frozen=True)
class SpecStep:
    """One step as the policy sees it before proposing.

    base_tokens / base_context_tokens: rows and attention work of everything in the step
    that is not a candidate's decode row (prompt chunks), in StepFeatures' units."""

    candidates: list[SpecCandidate]
    base_tokens: int = 0
    base_context_tokens: int = 0


@runtime_checkable
class SpeculationPolicy(Protocol):
    # chosen-k histogram: k_counts[k] decisions chose k (one per candidate request and step)
    k_counts: list[int]

    def choose(self, step: SpecStep) -> dict[str, int]:
        """k per candidate (0 <= k <= its max_k), for every candidate."""
        ...

    def observe_acceptance(self, request_id: str, proposer: str, num_proposed: int, num_accepted: int) -> None: ...

    def observe_step(self, features: StepFeatures, seconds: float) -> None: ...

    def release(self, request_id: str) -> None: ...

    def set_cluster_pressure(self, pressure: float) -> None: ...


def _check_pressure(pressure: float) -> float:
    if not math.isfinite(pressure) or pressure < 0:
        raise ValueError(f"cluster pressure must be finite and >= 0, got {pressure}")
    return float(pressure)


class FixedPolicy:
    """k = min(K, max_k) for every candidate, always (``policy: "fixed"``)."""

    def __init__(self, num_speculative_tokens: int):
        self.k = num_speculative_tokens
        self.k_counts = [0] * (num_speculative_tokens + 1)  # chosen-k histogram (metrics)

    def choose(self, step: SpecStep) -> dict[str, int]:
        out = {c.request_id: max(0, min(self.k, c.max_k)) for c in step.candidates}
        for k in out.values():
            self.k_counts[k] += 1
        return out

    def observe_acceptance(self, request_id: str, proposer: str, num_proposed: int, num_accepted: int) -> None:
        pass

    def observe_step(self, features: StepFeatures, seconds: float) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def set_cluster_pressure(self, pressure: float) -> None:
        _check_pressure(pressure)


class SmartSpecPolicy:
    """Goodput-maximising k per request (module docstring)."""

    def __init__(
        self,
        num_speculative_tokens: int,
        acceptance_priors: Mapping[str, float],
        warmup_steps: int | None = None,
        probe_interval: int = 0,
        min_gain: float = 0.02,
        step_model: StepTimeModel | None = None,
        acceptance: AcceptanceTracker | None = None,
        probe_single: bool = False,
    ):
        self.K = num_speculative_tokens
        self.acceptance = acceptance or AcceptanceTracker(acceptance_priors)
        self.step_model = step_model or StepTimeModel()
        self.warmup_steps = 2 * (self.K + 1) if warmup_steps is None else warmup_steps
        self.min_gain = min_gain
        self.pressure = 0.0
        self.k_counts = [0] * (self.K + 1)  # chosen-k histogram (metrics)
        self._decisions = 0
        if probe_interval < 0:
            raise ValueError(f"probe_interval must be >= 0, got {probe_interval}")
        self.probe_interval = probe_interval  # 0: never probe
        self._off_streak = 0  # consecutive decisions with speculation off although possible
        self.probe_single = probe_single  # probe one request, not all (module docstring, part 3)
        self._last_probed: str | None = None

    def set_cluster_pressure(self, pressure: float) -> None:
        self.pressure = _check_pressure(pressure)

    def observe_acceptance(self, request_id: str, proposer: str, num_proposed: int, num_accepted: int) -> None:
        self.acceptance.observe(request_id, proposer, num_proposed, num_accepted)

    def observe_step(self, features: StepFeatures, seconds: float) -> None:
        self.step_model.observe(features, seconds)

    def release(self, request_id: str) -> None:
        self.acceptance.release(request_id)

    def choose(self, step: SpecStep) -> dict[str, int]:
        cands = step.candidates
        if not cands:
            return {}
        caps = [max(0, min(self.K, c.max_k)) for c in cands]
        if self._decisions < self.warmup_steps:
            k = self._decisions % (self.K + 1)
            out = {c.request_id: min(k, cap) for c, cap in zip(cands, caps, strict=True)}
        else:
            out = self._goodput_choice(step, caps)
            if max(caps) > 0 and not any(out.values()):
                self._off_streak += 1
                if self.probe_interval and self._off_streak > self.probe_interval:
                    out = self._probe(cands, caps)
                    self._off_streak = 0
            else:
                self._off_streak = 0
        self._decisions += 1
        for k in out.values():
            self.k_counts[k] += 1
        return out

    def _probe(self, cands: list[SpecCandidate], caps: list[int]) -> dict[str, int]:
        """k = 1 for every candidate that can speculate, or (``probe_single``) for one."""
        if not self.probe_single:
            return {c.request_id: min(1, cap) for c, cap in zip(cands, caps, strict=True)}
        able = [c.request_id for c, cap in zip(cands, caps, strict=True) if cap > 0]
        pick = self._last_probed if self._last_probed in able else able[0]
        self._last_probed = pick
        return {c.request_id: int(c.request_id == pick) for c in cands}

    def _goodput_choice(self, step: SpecStep, caps: list[int]) -> dict[str, int]:
        cands = step.candidates
        b = self.step_model.coefficients
        ctx = np.array([c.context_len for c in cands], dtype=np.float64)
        base = StepFeatures(
            num_tokens=step.base_tokens + len(cands),
            context_tokens=step.base_context_tokens + int(ctx.sum()),
        )
        t0 = max(self.step_model.predict(base), 1e-9)
        e0 = float(len(cands))
        zero = {c.request_id: 0 for c in cands}
        kmax = max(caps)
        if kmax == 0:
            return zero
        acc = np.array([self.acceptance.estimate(c.request_id, c.proposer) for c in cands])
        j = np.arange(1, kmax + 1, dtype=np.float64)  # [K']
        valid = j[None, :] <= np.array(caps)[:, None]  # [B, K']
        gain = acc[:, None] ** j[None, :]  # a_i^j
        # one more verified row: its token, its draft token, and its attention over ctx_i + j
        cost = b[1] + b[2] + b[3] * (ctx[:, None] + j[None, :])
        req = np.broadcast_to(np.arange(len(cands))[:, None], valid.shape)[valid]
        jj = np.broadcast_to(j[None, :], valid.shape)[valid]
        g, c = gain[valid], cost[valid]
        ratio = np.where(c > 0, g / np.maximum(c, 1e-300), np.inf)
        order = np.lexsort((jj, -ratio))  # best ratio first; within a request j ascending
        g, c, jj, req = g[order], c[order], jj[order], req[order]
        rounds = np.maximum.accumulate(jj)  # sequential draft forwards of each prefix
        t_spec = np.cumsum(c) + b[4] * rounds
        goodput = (e0 + np.cumsum(g)) / (t0 + (1.0 + self.pressure) * t_spec)
        best = int(np.argmax(goodput))
        if goodput[best] <= (e0 / t0) * (1.0 + self.min_gain):
            return zero
        counts = np.bincount(req[: best + 1], minlength=len(cands))
        return {cand.request_id: int(n) for cand, n in zip(cands, counts, strict=True)}


def make_policy(config: SpeculativeConfig) -> SpeculationPolicy:
    """The policy ``config.policy`` names, with the method's acceptance prior."""
    if config.policy == "fixed":
        return FixedPolicy(config.num_speculative_tokens)
    return SmartSpecPolicy(
        config.num_speculative_tokens,
        {config.method: config.acceptance_prior},
        probe_interval=PROBE_INTERVAL,
        probe_single=config.method == "draft_model",  # a draft's probe pays its catch-up
    )
