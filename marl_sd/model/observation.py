"""Observation and global-state builder, shared by the simulator and the live controller.

Both feed the same `Features` (measured quantities, batched [B, N] / [B, N, M] / [B, M]) into
`ObservationBuilder`, so a policy sees identically normalized inputs in simulation and serving.
Encoding and decoding follow the feature table in `marl_sd.contract`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from marl_sd.contract import LOCAL_FEATURES, STATE_USER_BLOCKS, Feature, ObsSpec
from marl_sd.model.latency_model import take_last


@dataclass
class Features:
    """What an agent (or the controller on its behalf) can measure, batched over environments."""

    snr_db: Any  # [B, N, M] wideband uplink SNR to each server
    ul_mbps: Any  # [B, N, M] uplink rate if served by each server at current shares
    server: Any  # [B, N] long, current server
    draft_ms: Any  # [B, N] device draft cost per token
    power_w: Any  # [B, N] device drafting power
    max_gamma: Any  # [B, N] device speculation limit
    queue: Any  # [B, N] requests in the system (incl. the active one)
    remaining: Any  # [B, N] output tokens left of the active request
    acceptance: Any  # [B, N] running acceptance estimate
    outstanding: Any  # [B, N] mean outstanding requests over the last slot
    token_latency_ms: Any  # [B, N] running per-token latency of own requests
    srv_users: Any  # [B, M] users associated
    srv_queued_tokens: Any  # [B, M] draft tokens waiting for verification
    srv_busy: Any  # [B, M] busy fraction over the last slot
    srv_kv: Any  # [B, M] KV-cache occupancy (reserved / capacity; 0 when unlimited)
    time_frac: Any  # [B] episode progress
    context_tokens: Any = None  # [B, N] context of the active session (prompt + generated)
    srv_slowdown: Any = None  # [B, M] measured batch time over the profile's (1: as profiled)
    srv_verify_ms: Any = None  # [B, M] profile verify time of a round at the current load, times the slowdown
    pred_ms: Any = None  # [B, N, M] latency model's per-token latency at each server, best gamma
    pred_gamma: Any = None  # [B, N, M] that gamma
    pred_best_ms: Any = None  # [B, N] the lowest of pred_ms over servers
    pred_best_gamma: Any = None  # [B, N] the gamma at that server
    coin: Any = None  # [B, N] uniform in [0, 1), drawn afresh each slot (`contract`: damped moves)

    def to(self, device) -> Features:  # torch only
        return Features(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def with_predictions(self, model) -> Features:
        """These features with the physics ones filled in by `model` (a measured
        `marl_sd.model.latency_model.LatencyModel`): each site's verify time at its load, and the
        predicted latency of every (user, server) candidate. Torch or numpy alike."""
        server_scope = ("srv_users", "srv_queued_tokens", "srv_busy", "srv_slowdown")
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update({k: d[k][:, None, :] for k in server_scope})
        users = self.srv_users.clip(min=1)
        self.srv_verify_ms = model.sites.verify_ms(users, users * 5.0) * self.srv_slowdown
        self.pred_ms, self.pred_gamma = model.best(d)
        at = self.pred_ms.argmin(-1)[..., None]
        self.pred_best_ms, self.pred_best_gamma = take_last(self.pred_ms, at)[..., 0], take_last(self.pred_gamma, at)[..., 0]
        return self


ACCEPTANCE_DECAY = 0.95  # per verified round


def update_acceptance(hits, trials, accepted, rejected, active):
    """Decayed counts behind the running acceptance estimate: accepted drafts and examined
    drafts (accepted + the first rejection) of rounds where `active` (1/0). Scalars or tensors;
    the simulator and the live drafting clients measure acceptance the same way."""
    keep = 1.0 - (1.0 - ACCEPTANCE_DECAY) * active
    return hits * keep + active * accepted, trials * keep + active * (accepted + rejected)


def acceptance_estimate(hits, trials):
    """Running acceptance with a uniform prior (0.5 before any round)."""
    return (hits + 1.0) / (trials + 2.0)


def smooth_token_latency(prev, new):
    """Running per-token latency of completed requests: the first value, then an EMA (0.3 new)."""
    return new + (prev > 0) * 0.7 * (prev - new)


class _Ops:
    """The few array operations the builder needs, for torch tensors and numpy arrays alike
    (the live controller builds observations with numpy and never imports torch)."""

    def __init__(self, like):
        self.torch = type(like).__module__.startswith("torch")
        if self.torch:
            import torch

            self.t = torch
        else:
            self.t = np

    def f32(self, x):
        return x.float() if self.torch else x.astype("float32")

    def clip(self, x, lo=None, hi=None):
        if lo is None and hi is None:
            return x
        return x.clamp(lo, hi) if self.torch else self.t.clip(x, lo, hi)

    def one_hot(self, idx, n):
        if self.torch:
            return self.t.nn.functional.one_hot(idx.long(), n).float()
        return (idx[..., None] == self.t.arange(n)).astype("float32")

    def cat(self, parts, axis=-1):
        return self.t.cat(parts, axis) if self.torch else self.t.concatenate(parts, axis)

    def expand(self, x, shape):
        return x.expand(*shape) if self.torch else self.t.broadcast_to(x, shape)

    def amax(self, x, axis=-1):
        return x.max(axis, keepdim=True).values if self.torch else x.max(axis, keepdims=True)

    def pad(self, x, width):
        """Zero-pad the last axis to `width`."""
        n = width - x.shape[-1]
        if n <= 0:
            return x
        if self.torch:
            return self.t.nn.functional.pad(x, (0, n))
        return self.t.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)])

    def ones_like_servers(self, like, width):
        M = like.shape[-1]
        if self.torch:
            return (self.t.arange(width, device=like.device) < M).float().expand(*like.shape[:-1], width)
        return self.t.broadcast_to((self.t.arange(width) < M).astype("float32"), like.shape[:-1] + (width,))


class ObservationBuilder:
    """Encodes `Features` block by block as a feature table declares: the package's
    the spec's (`marl_sd.contract.LOCAL_FEATURES`, and the turn blocks if in turn), or the table
    a policy bundle's manifest carries."""

    def __init__(self, spec: ObsSpec, features: tuple[Feature, ...] | None = None):
        self.spec = spec
        self.features = spec.features if features is None else tuple(features)
        self.by_name = {f.name: f for f in self.features}

    def encode(self, feat: Feature, f: Features, o: _Ops):
        """One block, [B, N, width] for user blocks, [B, width] for server and episode blocks;
        per-server blocks zero-padded to the spec's `max_servers`."""
        s = self.spec
        if feat.kind == "valid":
            return o.ones_like_servers(f.srv_users, s.width(feat))
        if feat.kind == "turn":  # filled by the acting loop (`contract.TurnOrder`)
            return o.pad(o.f32(f.server[..., None] * 0), s.width(feat))
        x = getattr(f, feat.source)
        if feat.kind == "onehot":
            return o.one_hot(x, s.width(feat))
        if feat.kind == "indicator":
            return o.f32(x > 0)[..., None]
        x = o.f32(x) if feat.integer else x
        x = o.clip(x, *feat.clip)
        if feat.kind == "log1p":
            x = o.t.log1p(x)
        x = o.f32(x / s.scale(feat))
        return x[..., None] if feat.width == 1 else o.pad(x, s.width(feat))

    def local(self, f: Features):
        """[B, N, obs_dim] float32 local observations (per-server and episode blocks repeated in
        every user's row)."""
        o = _Ops(f.server)
        B, N = f.server.shape
        parts = []
        for feat in self.features:
            x = self.encode(feat, f, o)
            if feat.scope != "user":
                x = o.expand(x.reshape(B, 1, -1), (B, N, x.reshape(B, -1).shape[-1]))
            parts.append(x)
        return o.f32(o.cat(parts, -1))

    def state(self, f: Features):
        """[B, state_dim] global state for the centralized critic: the server blocks, user blocks
        pooled over users (mean and max), log of the user count, episode progress."""
        o = _Ops(f.server)
        B, N = f.server.shape
        servers = [self.encode(feat, f, o) for feat in self.features if feat.scope == "server"]
        per_user = [self.encode(self.by_name[b], f, o) for b in STATE_USER_BLOCKS]
        snr = self.encode(self.by_name["snr_db"], f, o)[..., : f.snr_db.shape[-1]]
        per_user.append(o.amax(snr))
        users = o.cat(per_user, -1)  # [B, N, per_user]
        pooled = [users.mean(1), o.amax(users, 1).reshape(B, -1)]
        count = o.f32(o.t.full_like(f.time_frac, np.log1p(N) / 3.0)).reshape(B, 1)
        episode = o.f32(f.time_frac).reshape(B, 1)
        return o.f32(o.cat(servers + pooled + [count, episode], -1))


def reencode(obs, spec: ObsSpec, builder: ObservationBuilder):
    """Observations encoded with the package table at `spec`, re-encoded with `builder`'s table
    (e.g. a policy bundle's own normalization constants). Torch."""
    scope = {f.source: f.scope for f in LOCAL_FEATURES if f.source is not None}
    # per-server and episode quantities are repeated in every user's row: take user 0's
    d = {k: (v if scope[k] == "user" else v[:, 0]) for k, v in decode_local(obs, spec).items()}
    return builder.local(Features(**d))


def decode_local(obs, spec: ObsSpec) -> dict:
    """Invert `ObservationBuilder.local` (torch): raw-scale features from [..., obs_dim]
    observations, by `Features` field name. Lets policies that reason in physical units
    (heuristics) consume the same observations as learned policies. Clipped values stay clipped;
    per-server quantities come back for the spec's `n_servers` (padding dropped)."""
    out, off = {}, 0
    for feat in LOCAL_FEATURES:
        w = spec.n_servers if feat.width != 1 else 1  # padding past the scenario's servers dropped
        x = obs[..., off : off + w] if feat.width != 1 else obs[..., off]
        off += spec.width(feat)
        if feat.source is None or feat.kind == "indicator":
            continue
        if feat.kind == "onehot":
            out[feat.source] = x.argmax(-1) if w > 1 else (x[..., 0] * 0).long()
            continue
        x = x * spec.scale(feat)
        if feat.kind == "log1p":
            x = x.expm1()
        out[feat.source] = x.round() if feat.integer else x
    out["max_gamma"] = out["max_gamma"].long()
    return out
