"""Observation and global-state builder, shared by the simulator and the live controller.

Both feed the same `Features` (measured quantities, batched [B, N] / [B, N, M] / [B, M]) into
`ObservationBuilder`, so a policy sees identically normalized inputs in simulation and serving.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from typing import Any


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
    time_frac: Any  # [B] episode progress

    def to(self, device) -> "Features":  # torch only
        return Features(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class ObsSpec:
    """Sizes and normalization constants; exported in the policy manifest."""

    n_users: int
    n_servers: int
    gamma_max: int
    queue_capacity: int
    max_output_tokens: int
    verify_token_budget: int

    @classmethod
    def from_config(cls, cfg) -> "ObsSpec":
        s, w = cfg.scenario, cfg.scenario.workload
        return cls(s.n_users, s.n_servers, cfg.env.gamma_max, w.queue_capacity, w.output_tokens.high,
                   s.verify_token_budget)

    @property
    def obs_dim(self) -> int:
        return 6 * self.n_servers + 10 + self.n_users

    @property
    def state_dim(self) -> int:
        return 3 * self.n_servers + self.n_users * (self.n_servers + 5) + 1

    def layout(self) -> list[tuple[str, int]]:
        M, N = self.n_servers, self.n_users
        return [("snr_db", M), ("ul_mbps", M), ("server_onehot", M), ("draft_ms", 1), ("power_w", 1),
                ("max_gamma", 1), ("queue", 1), ("remaining", 1), ("active", 1), ("acceptance", 1),
                ("outstanding", 1), ("token_latency_ms", 1), ("time_frac", 1), ("srv_users", M),
                ("srv_queued_tokens", M), ("srv_busy", M), ("agent_id", N)]


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


def action_nvec(cfg) -> list[int]:
    """Sizes of the MultiDiscrete action: [server, uplink bid, verify priority, gamma]."""
    return [cfg.scenario.n_servers, len(cfg.env.bid_weights), len(cfg.env.priority_weights), cfg.env.gamma_max + 1]


class _Ops:
    """The few array operations the builder needs, for torch tensors and numpy arrays alike
    (the live controller builds observations with numpy and never imports torch)."""

    def __init__(self, like):
        self.torch = type(like).__module__.startswith("torch")
        if self.torch:
            import torch

            self.t = torch
        else:
            import numpy as np

            self.t = np

    def f32(self, x):
        return x.float() if self.torch else x.astype("float32")

    def clip(self, x, lo=None, hi=None):
        return x.clamp(lo, hi) if self.torch else self.t.clip(x, lo, hi)

    def log1p(self, x):
        return self.t.log1p(x)

    def one_hot(self, idx, n):
        if self.torch:
            return self.t.nn.functional.one_hot(idx.long(), n).float()
        return (idx[..., None] == self.t.arange(n)).astype("float32")

    def cat(self, parts, axis=-1):
        return self.t.cat(parts, axis) if self.torch else self.t.concatenate(parts, axis)

    def expand(self, x, shape):
        return x.expand(*shape) if self.torch else self.t.broadcast_to(x, shape)

    def eye(self, n, like):
        return self.t.eye(n, device=like.device) if self.torch else self.t.eye(n, dtype="float32")

    def col(self, x):
        return x[..., None]

    def arange(self, n, like):
        return self.t.arange(n, device=like.device) if self.torch else self.t.arange(n)

    def ones_bool(self, shape, like):
        return self.t.ones(shape, dtype=self.t.bool, device=like.device) if self.torch else self.t.ones(shape, bool)


def action_mask(snr_db, max_gamma, nvec: list[int], coverage_snr_db: float):
    """[..., sum(nvec)] bool masks, flat per sub-action (torch or numpy, like the inputs):
    servers whose wideband UL SNR reaches `coverage_snr_db` (the best one always), every bid
    and priority level, gamma up to the device's limit. Shared by simulator and controller."""
    o = _Ops(snr_db)
    cover = (snr_db >= coverage_snr_db) | (o.one_hot(snr_db.argmax(-1), nvec[0]) > 0)
    bids = o.ones_bool(tuple(snr_db.shape[:-1]) + (nvec[1] + nvec[2],), snr_db)
    gam = o.arange(nvec[3], snr_db) <= max_gamma[..., None]
    return o.cat([cover, bids, gam], -1)


class ObservationBuilder:
    def __init__(self, spec: ObsSpec):
        self.spec = spec

    def _user_feats(self, f: Features, o: _Ops) -> dict:
        s = self.spec
        return {
            "snr": o.f32(o.clip(f.snr_db, -20.0, 40.0) / 20.0),
            "rate": o.f32(o.log1p(o.clip(f.ul_mbps, 0.0)) / 5.0),
            "srv": o.one_hot(f.server, s.n_servers),
            "draft": o.col(o.f32(f.draft_ms / 50.0)),
            "power": o.col(o.f32(f.power_w / 40.0)),
            "gmax": o.col(o.f32(f.max_gamma) / s.gamma_max),
            "queue": o.col(o.f32(f.queue) / s.queue_capacity),
            "rem": o.col(o.f32(f.remaining) / s.max_output_tokens),
            "active": o.col(o.f32(f.queue > 0)),
            "acc": o.col(o.f32(f.acceptance)),
            "out": o.col(o.f32(o.clip(f.outstanding, None, 10.0) / 5.0)),
            "lat": o.col(o.f32(o.clip(f.token_latency_ms, None, 500.0) / 100.0)),
        }

    def _server_feats(self, f: Features, o: _Ops):
        s = self.spec
        return o.cat([o.f32(f.srv_users) / s.n_users, o.f32(f.srv_queued_tokens) / s.verify_token_budget,
                      o.f32(f.srv_busy)], -1)  # [B, 3M]

    def local(self, f: Features):
        """[B, N, obs_dim] float32 local observations, agent id one-hot last."""
        o = _Ops(f.server)
        u = self._user_feats(f, o)
        B, N = f.server.shape
        srv = o.expand(self._server_feats(f, o)[:, None, :], (B, N, 3 * self.spec.n_servers))
        tf = o.expand(o.f32(f.time_frac).reshape(B, 1, 1), (B, N, 1))
        eye = o.expand(o.eye(N, f.server)[None], (B, N, N))
        parts = [u["snr"], u["rate"], u["srv"], u["draft"], u["power"], u["gmax"], u["queue"], u["rem"],
                 u["active"], u["acc"], u["out"], u["lat"], tf, srv, eye]
        return o.f32(o.cat(parts, -1))

    def state(self, f: Features):
        """[B, state_dim] global state for the centralized critic."""
        o = _Ops(f.server)
        u = self._user_feats(f, o)
        B = f.server.shape[0]
        best_snr = u["snr"].max(-1, keepdims=True) if not o.torch else u["snr"].max(-1, keepdim=True).values
        per_user = o.cat([u["srv"], u["queue"], u["rem"], u["draft"], u["acc"], best_snr], -1)
        return o.f32(o.cat([self._server_feats(f, o), per_user.reshape(B, -1), o.f32(f.time_frac).reshape(B, 1)], -1))


def decode_local(obs, spec: ObsSpec) -> dict:
    """Invert `ObservationBuilder.local`: raw-scale features from [..., obs_dim] observations.

    Lets policies that reason in physical units (heuristics) consume the same observations
    as learned policies.
    """
    vector = {"snr_db", "ul_mbps", "server_onehot", "srv_users", "srv_queued_tokens", "srv_busy", "agent_id"}
    out, off = {}, 0
    for name, width in spec.layout():
        out[name] = obs[..., off:off + width] if name in vector else obs[..., off]
        off += width
    M = spec.n_servers
    return {
        "snr_db": out["snr_db"] * 20.0,
        "ul_mbps": (out["ul_mbps"] * 5.0).expm1(),
        "server": out["server_onehot"].argmax(-1) if M > 1 else (out["server_onehot"][..., 0] * 0).long(),
        "draft_ms": out["draft_ms"] * 50.0,
        "power_w": out["power_w"] * 40.0,
        "max_gamma": (out["max_gamma"] * spec.gamma_max).round().long(),
        "queue": (out["queue"] * spec.queue_capacity).round(),
        "remaining": out["remaining"] * spec.max_output_tokens,
        "acceptance": out["acceptance"],
        "outstanding": out["outstanding"] * 5.0,
        "token_latency_ms": out["token_latency_ms"] * 100.0,
        "srv_users": out["srv_users"] * spec.n_users,
        "srv_queued_tokens": out["srv_queued_tokens"] * spec.verify_token_budget,
        "srv_busy": out["srv_busy"],
    }
