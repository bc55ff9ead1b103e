"""Verifier engine: per-session KV caches and batched, lossless verification in one forward.

Every session keeps its committed tokens and a KV cache of all but the last one (the
pending token). A verification batch concatenates `[pending, d_1..d_g]` of every waiting
session (different context lengths and numbers of drafts): past KV left-padded, queries
right-padded, a full 2D attention mask and explicit positions; each row's cache is then
sliced back to its accepted prefix (rollback).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

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
    owner: str | None = None  # the identity that opened it (KV accounting per identity)


@dataclass
class VerifyItem:
    sid: int
    drafts: list[int]
    q_ids: np.ndarray | None = None  # [g, k] int32
    q_probs: np.ndarray | None = None  # [g, k] float32


class ServerFull(RuntimeError):
    """No room for another session now (sessions or KV tokens): the client should try another server."""


class UnsupportedModel(ValueError):
    """A model whose KV cache this engine cannot roll back."""


def check_rollback_support(config) -> None:
    """Refuse models with sliding-window attention: cropping their rolling cache loses the window."""
    sliding = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", sliding is not None) and sliding:
        raise UnsupportedModel(
            f"{type(config).__name__} uses sliding-window attention (window {sliding}): "
            "its cache cannot be rolled back after rejected drafts"
        )
    if any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or [])):
        raise UnsupportedModel(f"{type(config).__name__} has sliding-attention layers: its cache cannot be rolled back")


def kv_bytes_per_token(config) -> int:
    """Bytes of KV cache one context token takes in `config`'s model (keys and values, every layer)."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(config, "dtype", None) or torch.float32
    size = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    return int(2 * config.num_hidden_layers * kv_heads * head_dim * size)


def default_kv_budget(config, memory_bytes: int | None = None, fraction: float = 0.5) -> int:
    """Context tokens the KV cache may hold over all sessions: `fraction` of the device's free
    memory (the GPU's when CUDA is up, else the machine's available RAM) over the bytes per token."""
    if memory_bytes is None:
        if torch.cuda.is_available():
            memory_bytes = torch.cuda.mem_get_info()[0]
        else:
            memory_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, int(fraction * memory_bytes / kv_bytes_per_token(config)))


class VerifierEngine:
    """Sessions and batched verification, within limits: `max_sessions`, `max_context` tokens per
    session (at most the model's positions), `kv_budget_tokens` of context over all sessions
    (default: half the free memory's worth, `default_kv_budget`; 0: unlimited), of which one
    identity may hold `kv_share`. Both are checked when a session opens and at every step that
    grows a context."""

    def __init__(
        self,
        model,
        max_sessions: int = 256,
        max_context: int | None = None,
        kv_budget_tokens: int | None = None,
        kv_share: float = 1.0,
    ):
        check_rollback_support(model.config)
        self.model = model
        self.vocab = model.config.vocab_size
        self.sessions: dict[int, Session] = {}
        self.max_sessions = max_sessions
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.max_context = min(max_context or limit, limit)
        budget = default_kv_budget(model.config) if kv_budget_tokens is None else kv_budget_tokens
        self.kv_budget = budget or None
        if not 0 < kv_share <= 1:
            raise ValueError(f"kv_share must be in (0, 1], got {kv_share}")
        self.kv_share = kv_share

    @property
    def kv_tokens(self) -> int:
        return sum(len(s.seq) for s in self.sessions.values())

    def kv_of(self, owner: str | None) -> int:
        """Context tokens held by `owner`'s sessions."""
        return sum(len(s.seq) for s in self.sessions.values() if s.owner == owner)

    def check_growth(self, owner: str | None, grow: int) -> None:
        """ServerFull unless the KV cache may grow by `grow` tokens for `owner` (its share and the total)."""
        if self.kv_budget is None:
            return
        if self.kv_tokens + grow > self.kv_budget:
            raise ServerFull(f"server full (KV budget {self.kv_budget} tokens, {self.kv_tokens} in use)")
        share = int(self.kv_share * self.kv_budget)
        if owner is not None and self.kv_of(owner) + grow > share:
            raise ServerFull(f"KV share used up: {owner} holds {self.kv_of(owner)} of its {share} tokens")

    # ---- sessions
    def admit(
        self, sid: int, tokens: list[int], greedy: bool = True, temperature: float = 1.0, seed: int = 0, owner: str | None = None
    ) -> Session:
        """Check limits and reserve the session (its cache is filled by `prefill_chunk`)."""
        if sid in self.sessions:
            raise ValueError(f"session {sid} already open")
        if not tokens or min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {self.vocab})")
        if len(tokens) >= self.max_context:
            raise ValueError(f"prompt of {len(tokens)} tokens exceeds the context limit ({self.max_context})")
        if len(self.sessions) >= self.max_sessions:
            raise ServerFull(f"server full ({self.max_sessions} sessions)")
        self.check_growth(owner, len(tokens))
        s = Session(
            sid,
            list(tokens),
            DynamicCache(config=self.model.config),
            greedy,
            temperature,
            np.random.default_rng(seed),
            owner=owner,
        )
        self.sessions[sid] = s
        return s

    def prefill_chunk(self, sid: int, upto: int) -> None:
        """Extend the session's cache to its first `upto` tokens (at most all but the pending one)."""
        s = self.sessions[sid]
        have = s.cache.get_seq_length()
        upto = min(upto, len(s.seq) - 1)
        if upto > have:
            prefill(self.model, s.seq[have : upto + 1], s.cache)

    def open(
        self, sid: int, tokens: list[int], greedy: bool = True, temperature: float = 1.0, seed: int = 0, owner: str | None = None
    ) -> None:
        """Admit and prefill in one go."""
        self.admit(sid, tokens, greedy, temperature, seed, owner)
        self.prefill_chunk(sid, len(tokens))

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
        """Everything about one upload that can be checked before it joins a batch."""
        s = self.sessions.get(it.sid)
        if s is None:
            raise KeyError(f"unknown session {it.sid}")
        if any(t < 0 or t >= self.vocab for t in it.drafts):
            raise ValueError(f"draft token ids must be in [0, {self.vocab})")
        if len(s.seq) + len(it.drafts) + 1 > self.max_context:
            raise ValueError(f"the session would exceed the context limit ({self.max_context} tokens)")
        if not s.greedy and it.drafts:
            if it.q_ids is None or it.q_probs is None or it.q_ids.shape[0] != len(it.drafts):
                raise ValueError("sampling sessions need top-k draft probabilities for every draft")
            if (it.q_ids < 0).any() or (it.q_ids >= self.vocab).any():
                raise ValueError("top-k ids out of the vocabulary")
            if not np.isfinite(it.q_probs).all() or (it.q_probs < 0).any() or (it.q_probs > 1 + 1e-6).any():
                raise ValueError("draft probabilities must be finite and in [0, 1]")
            q_draft = np.where(it.q_ids == np.asarray(it.drafts)[:, None], it.q_probs, 0.0).sum(-1)
            if (q_draft <= 0).any():
                raise ValueError(f"draft token at position {int(np.argmax(q_draft <= 0))} has q = 0 in its uploaded distribution")
        return s

    def verify_isolated(self, items: list[VerifyItem]) -> list:
        """`verify`, but a failure fails only its own row: a batched forward that raises is retried
        row by row; each entry is (n, new tokens) or the exception of that row alone."""
        try:
            return self.verify(items)
        except Exception:
            out = []
            for it in items:
                try:
                    out.append(self.verify([it])[0])
                except Exception as e:
                    out.append(e)
            return out

    @torch.no_grad()
    def verify(self, items: list[VerifyItem]) -> list:
        """Verify the drafts of several sessions in one forward pass; returns (n, new tokens) per
        row, or the row's exception when its acceptance step fails (that row is left unchanged)."""
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
            mask[i, Lmax - L[i] : Lmax + T[i]] = 1
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
                        K[i, :, Lmax - L[i] :] = s.cache.layers[li].keys[0]
                        V[i, :, Lmax - L[i] :] = s.cache.layers[li].values[0]
                layers.append((K, V))
            cache = DynamicCache(ddp_cache_data=layers)
            logits = self.model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        decided = []
        for i, (s, it) in enumerate(zip(sess, items)):
            try:
                decided.append(self._decide(s, it, logits[i, : T[i]]))
            except (ValueError, FloatingPointError) as e:
                decided.append(e)
        if B == 1 and isinstance(decided[0], Exception):
            rollback(sess[0].cache, L[0])  # undo the forward's extension of the shared cache
        out = []
        for i, (s, it) in enumerate(zip(sess, items)):
            if isinstance(decided[i], Exception):
                out.append(decided[i])
                continue
            n, new = decided[i]
            if B == 1:
                rollback(s.cache, L[i] + n + 1)
            else:
                lo, hi = Lmax - L[i], Lmax + n + 1
                s.cache = DynamicCache(
                    ddp_cache_data=[
                        (lay.keys[i : i + 1, :, lo:hi].clone(), lay.values[i : i + 1, :, lo:hi].clone()) for lay in cache.layers
                    ]
                )
            s.seq += new
            s.accepted += n
            s.rejected += int(n < len(it.drafts))
            out.append((n, new))
        return out
