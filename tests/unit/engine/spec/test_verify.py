"""Verification: greedy acceptance, and rejection sampling that keeps the target distribution.

The statistical tests run speculative decoding on a toy Markov "model" (the target's next-
token distribution depends on the previous token), with ragged k, drafts sampled from another
chain (q given) or chosen deterministically (q one-hot), and compare the distribution of the
first L emitted tokens with the exact one by a chi-square test. Two deliberately wrong
verifiers fail the same test, which shows it can tell.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.request import SamplingParams
from engine.sampler import sample
from engine.spec.verify import (
    DRAFT_STREAM,
    VerifyInput,
    seed_for,
    token_generator,
    verify,
    verify_greedy,
)

GREEDY = SamplingParams(temperature=0.0)


def onehot_logits(tokens: list[int], vocab: int = 8) -> torch.Tensor:
    x = torch.full((len(tokens), vocab), -5.0)
    x[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return x


# ------------------------------------------------------------------ greedy


def test_greedy_accepts_the_matching_prefix_then_emits_the_argmax():
    # request 0: k=3, argmax rows 4 5 6 7 -> drafts [4, 5, 1]: 2 accepted, correction 6
    # request 1: k=0 -> argmax 2
    # request 2: k=2, drafts [3, 3] all accepted -> bonus 1
    logits = onehot_logits([4, 5, 6, 7, 2, 3, 3, 1])
    out = verify(
        logits,
        [VerifyInput([4, 5, 1], GREEDY, 0), VerifyInput([], GREEDY, 7), VerifyInput([3, 3], GREEDY, 2)],
    )
    assert [o.token_ids for o in out] == [[4, 5, 6], [2], [3, 3, 1]]
    assert [o.num_accepted for o in out] == [2, 0, 2]
    assert verify_greedy(logits, [[0, 5, 6], [], [3, 0]]) == [[4], [2], [3, 3]]


def test_greedy_emits_only_argmax_tokens_on_random_logits():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ks = torch.randint(0, 5, (6,), generator=g).tolist()
        logits = torch.randn(sum(k + 1 for k in ks), 16, generator=g)
        arg = logits.argmax(-1).tolist()
        drafts, row = [], 0
        for k in ks:  # drafts agree with the argmax with probability 1/2 per position
            drafts.append(
                [arg[row + j] if torch.rand(1, generator=g) < 0.5 else (arg[row + j] + 1) % 16 for j in range(k)]
            )
            row += k + 1
        got, row = verify_greedy(logits, drafts), 0
        for k, d, toks in zip(ks, drafts, got, strict=True):
            m = next((j for j in range(k) if d[j] != arg[row + j]), k)
            assert toks == arg[row : row + m + 1]
            row += k + 1


def test_shape_errors_name_the_mismatch():
    with pytest.raises(ValueError, match=r"logits must be \[3, V\]"):
        verify(torch.zeros(2, 4), [VerifyInput([1, 2], GREEDY, 0)])
    with pytest.raises(ValueError, match=r"draft_probs must be \[2, 4\]"):
        verify(torch.zeros(3, 4), [VerifyInput([1, 2], SamplingParams(), 0, torch.ones(1, 4))])


# ------------------------------------------------------------------ seeds


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=1.3, top_k=5, seed=11),
        SamplingParams(temperature=0.6, top_p=0.7, seed=3),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=12345),
    ],
)
def test_k0_reproduces_the_engine_sampler_token_for_token(params):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 64, generator=g)
    ref, _ = sample(logits, [params] * 40, list(range(40)))
    got = verify(logits, [VerifyInput([], params, t) for t in range(40)])
    assert [o.token_ids for o in got] == [[t] for t in ref]


def test_seeded_rejection_sampling_is_reproducible_and_batch_independent():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4 + 3, 32, generator=g)
    q = torch.softmax(torch.randn(3, 32, generator=g), -1)
    a = VerifyInput([1, 2, 3], SamplingParams(temperature=1.0, seed=5), 10, q)
    b = VerifyInput([4, 5], SamplingParams(temperature=0.9, seed=6), 3)
    together = verify(logits, [a, b])
    assert verify(logits[:4], [a])[0] == together[0]
    assert verify(logits[4:], [b])[0] == together[1]
    assert verify(logits, [a, b]) == together


def test_streams_give_different_seeds():
    assert seed_for(7, 3) == (7 * 1_000_003 + 3)  # the sampler's formula
    assert seed_for(7, 3, DRAFT_STREAM) != seed_for(7, 3)
    assert token_generator(SamplingParams(), 0, "cpu") is None  # unseeded: global RNG


# ------------------------------------------------------------------ distribution


def chain(vocab: int, seed: int, sharp: float) -> torch.Tensor:
    """A random Markov chain [V, V]: row a is the next-token distribution after token a."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(vocab, vocab, generator=g), -1)


def run_markov(verifier, p_chain, q_chain, n_seq, length, k_of, seeded, deterministic, gen):
    """Speculative decoding of ``n_seq`` sequences from token 0; returns their first tokens [n_seq, length]."""
    out = [[] for _ in range(n_seq)]
    active = list(range(n_seq))
    while active:
        inputs, rows = [], []
        for i in active:
            prev = out[i][-1] if out[i] else 0
            k = k_of(i, len(out[i]))
            drafts, qrows = [], []
            for _ in range(k):
                q = q_chain[prev]
                d = int(q.argmax()) if deterministic else int(torch.multinomial(q, 1, generator=gen))
                drafts.append(d)
                qrows.append(q)
                rows.append(p_chain[prev])  # target row before draft d
                prev = d
            rows.append(p_chain[prev])  # bonus row
            params = SamplingParams(temperature=1.0, seed=i if seeded else None)
            probs = None if deterministic or not k else torch.stack(qrows)
            inputs.append(VerifyInput(drafts, params, len(out[i]), probs))
        logits = torch.log(torch.stack(rows))
        for i, res in zip(active, verifier(logits, inputs), strict=True):
            out[i].extend(res)
        active = [i for i in active if len(out[i]) < length]
    return torch.tensor([o[:length] for o in out])


def chi_square_pvalue(samples: torch.Tensor, p_chain: torch.Tensor) -> float:
    vocab, length = p_chain.shape[0], samples.shape[1]
    counts = torch.zeros([vocab] * length)
    for row in samples.tolist():
        counts[tuple(row)] += 1
    stat = 0.0
    for seq in itertools.product(range(vocab), repeat=length):
        prob, prev = 1.0, 0
        for t in seq:
            prob *= float(p_chain[prev, t])
            prev = t
        expected = prob * samples.shape[0]
        stat += (float(counts[seq]) - expected) ** 2 / expected
    df = vocab**length - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0)))


def emitted(logits, inputs):
    return [o.token_ids for o in verify(logits, inputs)]


def ragged_k(i: int, done: int) -> int:
    return (i + done) % 4  # 0..3, changing per request and per step


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-drafts", "deterministic-drafts"])
def test_rejection_sampling_preserves_the_target_distribution(deterministic):
    torch.manual_seed(0)
    p, q = chain(5, 1, 1.5), chain(5, 2, 1.5)
    gen = torch.Generator().manual_seed(3)
    samples = run_markov(emitted, p, q, 12_000, 3, ragged_k, False, deterministic, gen)
    assert chi_square_pvalue(samples, p) > 1e-3
    # first-token marginal within 2 % total variation of p(. | 0)
    marg = torch.bincount(samples[:, 0], minlength=5).double() / samples.shape[0]
    assert 0.5 * (marg - p[0].double()).abs().sum() < 0.02


def test_seeded_requests_preserve_the_target_distribution():
    p, q = chain(4, 4, 1.5), chain(4, 5, 1.5)
    gen = torch.Generator().manual_seed(6)
    samples = run_markov(emitted, p, q, 6_000, 2, ragged_k, True, False, gen)
    assert chi_square_pvalue(samples, p) > 1e-3


@pytest.mark.slow
def test_the_chi_square_test_catches_wrong_verifiers():
    p, q = chain(5, 1, 1.5), chain(5, 2, 1.5)

    def accept_all(logits, inputs):  # emits the drafts as they are: the draft's distribution
        out, row = [], 0
        for inp in inputs:
            k = len(inp.draft_token_ids)
            bonus = int(torch.multinomial(torch.softmax(logits[row + k], -1), 1))
            out.append([*inp.draft_token_ids, bonus])
            row += k + 1
        return out

    def resample_from_p(logits, inputs):  # on rejection samples p instead of norm(max(0, p - q))
        out, row = [], 0
        for inp in inputs:
            toks = []
            for j, x in enumerate(inp.draft_token_ids):
                pj = torch.softmax(logits[row + j], -1)
                if torch.rand(1) < min(1.0, float(pj[x] / inp.draft_probs[j, x])):
                    toks.append(x)
                    continue
                toks.append(int(torch.multinomial(pj, 1)))
                break
            else:
                toks.append(int(torch.multinomial(torch.softmax(logits[row + len(toks)], -1), 1)))
            out.append(toks)
            row += len(inp.draft_token_ids) + 1
        return out

    torch.manual_seed(0)
    for wrong in (accept_all, resample_from_p):
        gen = torch.Generator().manual_seed(3)
        samples = run_markov(wrong, p, q, 6_000, 3, lambda i, d: 3, False, False, gen)
        assert chi_square_pvalue(samples, p) < 1e-6, wrong.__name__


# ------------------------------------------------------------------ logprobs


def test_logprobs_of_emitted_tokens_are_the_targets():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3 + 4, 16, generator=g)
    arg = logits.argmax(-1).tolist()
    a = VerifyInput([arg[0], arg[1]], SamplingParams(temperature=0.0, logprobs=2), 0)
    b = VerifyInput([1, 2, 3], SamplingParams(temperature=1.0, seed=1, logprobs=0), 5)
    c = VerifyInput([], SamplingParams(temperature=1.0, seed=1), 0)  # no logprobs asked
    out = verify(torch.cat([logits, logits[:1]]), [a, b, c])
    logp = torch.log_softmax(torch.cat([logits, logits[:1]]), -1)
    for res, start in zip(out[:2], (0, 3), strict=True):
        assert len(res.logprobs) == len(res.token_ids)
        for j, (tok, lp) in enumerate(zip(res.token_ids, res.logprobs, strict=True)):
            assert lp.token_id == tok
            assert math.isclose(lp.logprob, float(logp[start + j, tok]), rel_tol=1e-6)
    assert out[0].token_ids == arg[:3]
    assert len(out[0].logprobs[0].top) == 2 and out[1].logprobs[0].top == {}
    assert out[2].logprobs is None
