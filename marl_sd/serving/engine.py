"""Verifier engine: per-session KV caches and batched, lossless verification in one forward.

Every session keeps its committed tokens and a KV cache of all but the last one (the
pending token). A verification batch concatenates `[pending, d_1..d_g]` of every waiting
session (different context lengths and numbers of drafts): past KV left-padded, queries
right-padded, a full 2D attention mask and explicit positions; each row's cache is then
sliced back to its accepted prefix (rollback).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from marl_sd.serving.models import prefill, rollback
from marl_sd.serving.speculative import accept_greedy, dense_q, speculative_verify


@dataclass
class Session:
    sid: int
    seq: list[int]
    cache: object
    greedy: bool = True
    temperature: float = 1.0
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    accepted: int = 0
    rejected: int = 0


@dataclass
class VerifyItem:
    sid: int
    drafts: list[int]
    q_ids: np.ndarray | None = None  # [g, k] int32
    q_probs: np.ndarray | None = None  # [g, k] float32


class VerifierEngine:
    def __init__(self, model, max_sessions: int = 256):
        self.model = model
        self.vocab = model.config.vocab_size
        self.sessions: dict[int, Session] = {}
        self.max_sessions = max_sessions

    # ---- sessions
    def open(self, sid: int, tokens: list[int], greedy: bool = True, temperature: float = 1.0, seed: int = 0) -> None:
        if sid in self.sessions:
            raise ValueError(f"session {sid} already open")
        if len(self.sessions) >= self.max_sessions:
            raise RuntimeError(f"server full ({self.max_sessions} sessions)")
        if not tokens or min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {self.vocab})")
        self.sessions[sid] = Session(sid, list(tokens), prefill(self.model, list(tokens)), greedy, temperature,
                                     np.random.default_rng(seed))

    def close(self, sid: int) -> bool:
        return self.sessions.pop(sid, None) is not None

    # ---- verification
    def _probs(self, logits: torch.Tensor, s: Session) -> np.ndarray:
        return torch.softmax(logits.double() / s.temperature, -1).numpy()

    def _decide(self, s: Session, it: VerifyItem, logits: torch.Tensor) -> tuple[int, list[int]]:
        if s.greedy:
            return accept_greedy(it.drafts, logits.argmax(-1).tolist())
        p = self._probs(logits, s)
        q = dense_q(it.q_ids, it.q_probs, self.vocab) if it.drafts else np.zeros((0, self.vocab))
        return speculative_verify(p, q, it.drafts, s.rng)

    def validate(self, it: VerifyItem) -> Session:
        s = self.sessions.get(it.sid)
        if s is None:
            raise KeyError(f"unknown session {it.sid}")
        if any(t < 0 or t >= self.vocab for t in it.drafts):
            raise ValueError(f"draft token ids must be in [0, {self.vocab})")
        if not s.greedy and it.drafts:
            if it.q_ids is None or it.q_ids.shape[0] != len(it.drafts):
                raise ValueError("sampling sessions need top-k draft probabilities for every draft")
            if (it.q_ids < 0).any() or (it.q_ids >= self.vocab).any():
                raise ValueError("top-k ids out of the vocabulary")
        return s

    @torch.no_grad()
    def verify(self, items: list[VerifyItem]) -> list[tuple[int, list[int]]]:
        """Verify the drafts of several sessions in one forward pass; returns (n, new tokens)."""
        from transformers import DynamicCache

        sess = [self.validate(it) for it in items]
        B = len(items)
        L = [s.cache.get_seq_length() for s in sess]
        Q = [[s.seq[-1]] + list(it.drafts) for s, it in zip(sess, items)]
        T = [len(q) for q in Q]
        Lmax, Tmax = max(L), max(T)
        ids = torch.zeros(B, Tmax, dtype=torch.long)
        mask = torch.zeros(B, Lmax + Tmax, dtype=torch.long)
        pos = torch.zeros(B, Tmax, dtype=torch.long)
        for i in range(B):
            ids[i, : T[i]] = torch.tensor(Q[i])
            mask[i, Lmax - L[i]: Lmax + T[i]] = 1
            pos[i] = L[i] + torch.arange(Tmax)
        cfg = self.model.config
        if B == 1:
            cache = sess[0].cache
            logits = self.model(ids, past_key_values=cache, use_cache=True).logits
        else:
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            dtype = next(self.model.parameters()).dtype
            layers = []
            for li in range(cfg.num_hidden_layers):
                K = torch.zeros(B, cfg.num_key_value_heads, Lmax, hd, dtype=dtype)
                V = torch.zeros_like(K)
                for i, s in enumerate(sess):
                    if L[i]:
                        K[i, :, Lmax - L[i]:] = s.cache.layers[li].keys[0]
                        V[i, :, Lmax - L[i]:] = s.cache.layers[li].values[0]
                layers.append((K, V))
            cache = DynamicCache(ddp_cache_data=layers)
            logits = self.model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        out = []
        for i, (s, it) in enumerate(zip(sess, items)):
            n, new = self._decide(s, it, logits[i, : T[i]])
            if B == 1:

                rollback(s.cache, L[i] + n + 1)
            else:
                lo, hi = Lmax - L[i], Lmax + n + 1
                s.cache = DynamicCache(ddp_cache_data=[(lay.keys[i: i + 1, :, lo:hi].clone(),
                                                        lay.values[i: i + 1, :, lo:hi].clone()) for lay in cache.layers])
            s.seq += new
            s.accepted += n
            s.rejected += int(n < len(it.drafts))
            out.append((n, new))
        return out
