"""The lossless speculative-decoding rule as pure functions, shared by the server and tests.

Sampling (Leviathan et al. / Chen et al. 2023): accept draft x with probability
min(1, p(x)/q(x)); on rejection emit a token from the normalized residual (p - q)+; when
every draft is accepted emit a bonus token from p. Greedy decoding is the special case of
one-hot p and q: accept while the draft equals the target's argmax.
"""

from __future__ import annotations

import numpy as np


def accept_greedy(drafts: list[int], target_argmax: list[int]) -> tuple[int, list[int]]:
    """target_argmax[j]: the target's choice after the first j drafts (len = len(drafts) + 1)."""
    n = 0
    while n < len(drafts) and drafts[n] == target_argmax[n]:
        n += 1
    return n, list(drafts[:n]) + [int(target_argmax[n])]


def sample_weights(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from unnormalized non-negative weights; never a zero-weight index."""
    c = np.cumsum(weights)
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return i if i < len(c) else int(np.flatnonzero(weights)[-1])


def speculative_verify(p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator) -> tuple[int, list[int]]:
    """p: (g+1, V) target probabilities, row i conditioned on the prefix + drafts[:i];
    q: (g, V) the draft distributions the drafts were actually sampled from.
    Returns (n accepted, drafts[:n] + one more token)."""
    g = len(drafts)
    for i, x in enumerate(drafts):
        if q[i, x] <= 0.0:
            raise ValueError(f"draft token {x} at position {i} has q = 0 in the uploaded distribution")
        if rng.random() * q[i, x] < p[i, x]:
            continue
        resid = np.maximum(p[i] - q[i], 0.0)
        if resid.sum() <= 0.0:
            resid = p[i]
        return i, list(drafts[:i]) + [sample_weights(resid, rng)]
    return g, list(drafts) + [sample_weights(p[g], rng)]


def top_k_renormalized(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probs) of the k most likely tokens, renormalized, as float32 (the wire precision).
    A drafter must sample from exactly this distribution for verification to stay lossless."""
    k = min(k, probs.shape[-1])
    ids = np.argpartition(probs, -k)[-k:]
    ids = ids[np.argsort(-probs[ids], kind="stable")]
    pr = probs[ids].astype(np.float32)
    pr = (pr / pr.sum()).astype(np.float32)
    return ids.astype(np.int32), pr


def dense_q(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    """Server side: the uploaded (ids, probs) rows as dense float64 distributions [g, V]."""
    q = np.zeros((ids.shape[0], vocab), dtype=np.float64)
    np.put_along_axis(q, ids.astype(np.int64), probs.astype(np.float64), axis=1)
    return q
