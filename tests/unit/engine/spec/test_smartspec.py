"""SmartSpec policy on fabricated measurements: no model, no engine.

The fabricated machine: a step costs 20 ms + 0.5 ms per computed row + 0.2 ms per draft token
+ 1 ms per sequential draft forward + 1 us per 1000 context tokens of attention work. A
small batch is dominated by the fixed cost (speculation nearly free); a large one by the
per-row cost (speculation wastes rows on rejected tokens).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.spec.config import SpeculativeConfig
from engine.spec.smartspec import (
    AcceptanceTracker,
    FixedPolicy,
    SmartSpecPolicy,
    SpecCandidate,
    SpecStep,
    StepFeatures,
    StepTimeModel,
    attention_work,
    expected_tokens,
    make_policy,
)

TRUE = np.array([0.020, 0.0005, 0.0002, 0.0, 0.001])  # intercept, tokens, draft, context, rounds
TRUE[3] = 1e-9


def machine(f: StepFeatures, noise: float = 0.0, rng: random.Random | None = None) -> float:
    t = float(TRUE @ f.vector())
    return t * (1.0 + (rng.uniform(-noise, noise) if rng else 0.0))


def trained_policy(k_max: int = 5, prior: float = 0.6, seed: int = 0, noise: float = 0.05, **kw) -> SmartSpecPolicy:
    """A policy whose step model has seen 200 varied steps of the fabricated machine."""
    rng = random.Random(seed)
    pol = SmartSpecPolicy(k_max, {"draft_model": prior}, **kw)
    for _ in range(200):
        b = rng.randint(1, 128)
        k = rng.randint(0, k_max)
        ctx = rng.randint(10, 2000)
        f = StepFeatures(b * (k + 1), b * k, b * attention_work(ctx, k + 1), k)
        pol.observe_step(f, machine(f, noise, rng))
    pol._decisions = pol.warmup_steps  # past the exploration phase
    return pol


def step(batch: int, ctx: int = 200, max_k: int = 5, proposer: str = "draft_model") -> SpecStep:
    return SpecStep([SpecCandidate(f"r{i}", proposer, ctx, max_k) for i in range(batch)])


def mean_k(choice: dict[str, int]) -> float:
    return sum(choice.values()) / len(choice)


def test_expected_tokens_formula():
    assert expected_tokens(0, 0.7) == pytest.approx(1.0)
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(4, 1.0) == 5.0
    assert attention_work(10, 3) == 11 + 12 + 13


def test_step_model_recovers_the_machine_and_stays_non_negative():
    exact = trained_policy(noise=0.0).step_model.coefficients
    assert exact == pytest.approx(TRUE, rel=1e-3, abs=1e-9)
    noisy = trained_policy(noise=0.05).step_model
    assert (noisy.coefficients >= 0).all()
    for f in (StepFeatures(64 * 3, 64 * 2, 64 * attention_work(500, 3), 2), StepFeatures(5, 0, 5 * 300, 0)):
        assert noisy.predict(f) == pytest.approx(machine(f), rel=0.05)
    # a feature that never varied (n-gram: no draft rounds) gets coefficient 0, not a guess
    m = StepTimeModel()
    for b in range(1, 50):
        m.observe(StepFeatures(b), 0.01 + 0.001 * b)
    assert m.coefficients[4] == 0.0 and m.coefficients[1] == pytest.approx(0.001, rel=1e-3)
    with pytest.raises(ValueError, match="step seconds"):
        m.observe(StepFeatures(1), float("nan"))


def test_k_falls_as_the_batch_grows_and_speculation_turns_off():
    pol = trained_policy()
    ks = [mean_k(pol.choose(step(b))) for b in (1, 4, 16, 64, 128, 256)]
    assert ks[0] >= 3, ks
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False)), ks
    assert ks[-1] == 0.0, ks  # k = 0 under load: speculation off


def test_speculation_returns_when_the_load_falls():
    pol = trained_policy()
    assert mean_k(pol.choose(step(256))) == 0.0
    assert mean_k(pol.choose(step(2))) > 0.0


def test_k_rises_with_acceptance():
    low, high = trained_policy(prior=0.2), trained_policy(prior=0.9)
    for b in (4, 32):
        assert mean_k(high.choose(step(b))) > mean_k(low.choose(step(b)))


def test_online_acceptance_moves_k_for_one_request():
    pol = trained_policy(prior=0.6)
    batch = step(24)
    before = pol.choose(batch)
    for _ in range(10):  # r0's drafts are always rejected, r1's always accepted
        pol.observe_acceptance("r0", "draft_model", 3, 0)
        pol.observe_acceptance("r1", "draft_model", 3, 3)
    after = pol.choose(batch)
    assert after["r0"] < before["r0"] and after["r0"] == 0
    assert after["r1"] > before["r1"]
    pol.release("r0")  # forgotten: back to the proposer's estimate
    assert pol.acceptance.estimate("r0", "draft_model") == pytest.approx(
        pol.acceptance.proposer_estimate("draft_model")
    )


def test_cluster_pressure_backs_off_earlier():
    pol = trained_policy()
    calm = [mean_k(pol.choose(step(b))) for b in (2, 8, 24)]
    pol.set_cluster_pressure(3.0)
    pressed = [mean_k(pol.choose(step(b))) for b in (2, 8, 24)]
    assert all(p <= c for p, c in zip(pressed, calm, strict=True)) and sum(pressed) < sum(calm), (calm, pressed)
    pol.set_cluster_pressure(0.0)
    assert [mean_k(pol.choose(step(b))) for b in (2, 8, 24)] == calm
    with pytest.raises(ValueError, match="cluster pressure"):
        pol.set_cluster_pressure(-1.0)


def test_caps_are_respected_and_every_candidate_gets_a_k():
    pol = trained_policy()
    cands = [SpecCandidate("a", "draft_model", 50, 0), SpecCandidate("b", "draft_model", 50, 2)]
    cands += [SpecCandidate("c", "draft_model", 50, 9)]
    out = pol.choose(SpecStep(cands))
    assert set(out) == {"a", "b", "c"} and out["a"] == 0 and out["b"] <= 2 and out["c"] <= 5
    assert pol.choose(SpecStep([])) == {}


def test_warmup_cycles_k_before_any_measurement():
    pol = SmartSpecPolicy(3, {"ngram": 0.5})
    assert pol.warmup_steps == 8
    seen = [pol.choose(step(2, max_k=3, proposer="ngram"))["r0"] for _ in range(8)]
    assert seen == [0, 1, 2, 3, 0, 1, 2, 3]
    assert sum(pol.k_counts) == 16


def test_acceptance_tracker_prior_and_updates():
    t = AcceptanceTracker({"ngram": 0.3})
    assert t.estimate("x", "ngram") == pytest.approx(0.3)
    t.observe("x", "ngram", 4, 4)  # all accepted: 4 of 4
    t.observe("x", "ngram", 4, 4)
    assert t.estimate("x", "ngram") > t.proposer_estimate("ngram") > 0.3
    t.observe("y", "ngram", 4, 0)  # first rejected: 0 of 1
    assert t.estimate("y", "ngram") < t.proposer_estimate("ngram")
    t.observe("y", "ngram", 0, 0)  # nothing proposed: no information
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        t.observe("y", "ngram", 2, 3)
    with pytest.raises(KeyError, match="no acceptance prior for proposer 'draft_model'"):
        t.estimate("y", "draft_model")


def test_fixed_policy_and_make_policy():
    fixed = make_policy(SpeculativeConfig("ngram", 4, policy="fixed"))
    assert isinstance(fixed, FixedPolicy)
    assert fixed.choose(SpecStep([SpecCandidate("a", "ngram", 9, 2), SpecCandidate("b", "ngram", 9, 7)])) == {
        "a": 2,
        "b": 4,
    }
    smart = make_policy(SpeculativeConfig("draft_model", 3, model="/d", acceptance_prior=0.7))
    assert isinstance(smart, SmartSpecPolicy)
    assert smart.acceptance.proposer_estimate("draft_model") == pytest.approx(0.7)


def test_closed_loop_tracks_the_best_fixed_k_as_load_rises_and_falls():
    """From a cold start, the policy drives the fabricated machine through a load ramp up and
    down; acceptance is drawn per token (a = 0.7). In every phase its realised goodput is
    within 10 % of the best fixed k's expected goodput, and k is 0 at the peak."""
    rng = random.Random(1)
    a, ctx, K = 0.7, 300, 5
    pol = SmartSpecPolicy(K, {"draft_model": 0.5})
    phases = (1, 8, 64, 256, 64, 8, 1)
    for b in phases:
        tokens, seconds, ks = 0, 0.0, []
        for s in range(80):
            choice = pol.choose(step(b, ctx, K))
            emitted = rounds = 0
            for rid, k in choice.items():
                m = next((j for j in range(k) if rng.random() >= a), k)
                if k:
                    pol.observe_acceptance(rid, "draft_model", k, m)
                emitted += m + 1
                rounds = max(rounds, k)
            kv = list(choice.values())
            f = StepFeatures(b + sum(kv), sum(kv), sum(attention_work(ctx, k + 1) for k in kv), rounds)
            t = machine(f, 0.05, rng)
            pol.observe_step(f, t)
            if s >= 20:  # after the policy had time to adapt to the phase
                tokens, seconds = tokens + emitted, seconds + t
                ks.append(mean_k(choice))
        best = max(
            b * expected_tokens(k, a) / machine(StepFeatures(b * (k + 1), b * k, b * attention_work(ctx, k + 1), k))
            for k in range(K + 1)
        )
        assert tokens / seconds >= 0.9 * best, (b, tokens / seconds, best, sum(ks) / len(ks))
        if b == 256:
            assert sum(ks) == 0.0
        if b == 1:
            assert sum(ks) / len(ks) >= 2


def test_a_draft_model_probes_one_request_and_keeps_probing_it():
    """Speculation priced out (batch 128: a verified row costs more than it gains): the n-gram
    policy probes every candidate, the draft-model policy one, the same while it runs
    (its draft KV is the one that is nearly caught up), another once it has left."""
    batch = [SpecCandidate(f"r{i}", "draft_model", 200, 5) for i in range(128)]
    for single in (False, True):
        pol = trained_policy(probe_interval=2, probe_single=single, noise=0.0, prior=0.1)
        choices = [pol.choose(SpecStep(batch)) for _ in range(6)]
        assert [sum(c.values()) for c in choices] == [0, 0, 128 if not single else 1] * 2
        if single:
            assert choices[2] == choices[5] and choices[2]["r0"] == 1
            pol.choose(SpecStep(batch[1:]))
            pol.choose(SpecStep(batch[1:]))
            assert pol.choose(SpecStep(batch[1:]))["r1"] == 1  # r0 left: the next one
    assert make_policy(SpeculativeConfig("draft_model", 3, model="d")).probe_single
    assert not make_policy(SpeculativeConfig("ngram", 3)).probe_single
