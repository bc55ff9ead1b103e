"""Lossless speculative sampling: the output distribution equals the target's (chi-square),
with two classic bugs as negative controls proving the test has power."""

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from marl_sd.serving.speculative import accept_greedy, dense_q, sample_weights, speculative_verify, top_k_renormalized

pytestmark = pytest.mark.unit

V, START, N_TOK = 5, 0, 3


def bigram(rng, a=0.7):
    return rng.dirichlet(np.full(V, a), size=V)


def buggy_residual_verify(p, q, drafts, rng):
    for i, x in enumerate(drafts):
        if rng.random() * q[i, x] < p[i, x]:
            continue
        return i, list(drafts[:i]) + [sample_weights(p[i], rng)]  # BUG: p instead of (p - q)+
    return len(drafts), list(drafts) + [sample_weights(p[len(drafts)], rng)]


def run_sd(P, Q, n, rng, top_k=None, truncated_upload=False, verify=speculative_verify):
    counts = np.zeros(V**N_TOK)
    for _ in range(n):
        seq = [START]
        while len(seq) - 1 < N_TOK:
            g = int(rng.integers(1, 4))
            drafts, qs = [], []
            prev = seq[-1]
            for _ in range(g):
                q = Q[prev]
                if top_k is not None and not truncated_upload:
                    ids, pr = top_k_renormalized(q, top_k)
                    q = dense_q(ids[None], pr[None], V)[0]
                x = sample_weights(q, rng)
                if truncated_upload:  # BUG: sampled from full q, uploads top-k (+ x) renormalized
                    ids = np.unique(np.append(np.argsort(q)[-top_k:], x))
                    q = np.zeros(V)
                    q[ids] = Q[prev][ids] / Q[prev][ids].sum()
                drafts.append(x)
                qs.append(q)
                prev = x
            ctx = [seq[-1]] + drafts
            p = np.stack([P[t] for t in ctx])
            _, new = verify(p, np.stack(qs), drafts, rng)
            seq += new
        toks = seq[1 : 1 + N_TOK]
        counts[int(np.ravel_multi_index(toks, (V,) * N_TOK))] += 1
    return counts


def pvalue(counts, P):
    probs = np.zeros(V**N_TOK)
    for i, toks in enumerate(itertools.product(range(V), repeat=N_TOK)):
        pr, prev = 1.0, START
        for t in toks:
            pr, prev = pr * P[prev, t], t
        probs[i] = pr
    exp = probs * counts.sum()
    big = exp >= 5
    return chisquare(np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())).pvalue


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    P = bigram(rng)
    return P, 0.5 * P + 0.5 * bigram(rng)


def test_sampling_matches_target(pair):
    P, Q = pair
    assert pvalue(run_sd(P, Q, 20000, np.random.default_rng(1)), P) > 1e-3
    assert pvalue(run_sd(P, Q, 20000, np.random.default_rng(2), top_k=3), P) > 1e-3


def test_negative_controls_are_caught(pair):
    P, Q = pair
    assert pvalue(run_sd(P, Q, 20000, np.random.default_rng(3), verify=buggy_residual_verify), P) < 1e-6
    assert pvalue(run_sd(P, Q, 20000, np.random.default_rng(4), top_k=2, truncated_upload=True), P) < 1e-6


def test_greedy_is_the_one_hot_case():
    rng = np.random.default_rng(5)
    eye = np.eye(V)
    for _ in range(500):
        tgt = rng.integers(0, V, 4)
        drafts = [int(t) if rng.random() < 0.7 else int((t + 1) % V) for t in tgt[:3]]
        assert speculative_verify(eye[tgt], eye[drafts], drafts, rng) == accept_greedy(drafts, list(tgt))


def test_zero_probability_draft_rejected():
    with pytest.raises(ValueError, match="q = 0"):
        speculative_verify(np.full((2, V), 0.2), np.zeros((1, V)), [3], np.random.default_rng(0))
