"""Observation and global-state builder, shared by the simulator and the live controller.

Both feed the same `Features` (measured quantities, batched [B, N] / [B, N, M] / [B, M]) into
`ObservationBuilder`, so a policy sees identically normalized inputs in simulation and serving.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Features:
    """What an agent (or the controller on its behalf) can measure, batched over environments."""

    snr_db: torch.Tensor  # [B, N, M] wideband uplink SNR to each server
    ul_mbps: torch.Tensor  # [B, N, M] uplink rate if served by each server at current shares
    server: torch.Tensor  # [B, N] long, current server
    draft_ms: torch.Tensor  # [B, N] device draft cost per token
    power_w: torch.Tensor  # [B, N] device drafting power
    max_gamma: torch.Tensor  # [B, N] device speculation limit
    queue: torch.Tensor  # [B, N] requests in the system (incl. the active one)
    remaining: torch.Tensor  # [B, N] output tokens left of the active request
    acceptance: torch.Tensor  # [B, N] running acceptance estimate
    outstanding: torch.Tensor  # [B, N] mean outstanding requests over the last slot
    token_latency_ms: torch.Tensor  # [B, N] running per-token latency of own requests
    srv_users: torch.Tensor  # [B, M] users associated
    srv_queued_tokens: torch.Tensor  # [B, M] draft tokens waiting for verification
    srv_busy: torch.Tensor  # [B, M] busy fraction over the last slot
    time_frac: torch.Tensor  # [B] episode progress

    def to(self, device) -> "Features":
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


class ObservationBuilder:
    def __init__(self, spec: ObsSpec):
        self.spec = spec
        self._eye = torch.eye(spec.n_users)

    def _user_feats(self, f: Features) -> dict[str, torch.Tensor]:
        s = self.spec
        return {
            "snr": ((f.snr_db.clamp(-20.0, 40.0)) / 20.0),
            "rate": torch.log1p(f.ul_mbps.clamp(min=0.0)) / 5.0,
            "srv": torch.nn.functional.one_hot(f.server, s.n_servers).float(),
            "draft": (f.draft_ms / 50.0).unsqueeze(-1),
            "power": (f.power_w / 40.0).unsqueeze(-1),
            "gmax": (f.max_gamma.float() / s.gamma_max).unsqueeze(-1),
            "queue": (f.queue.float() / s.queue_capacity).unsqueeze(-1),
            "rem": (f.remaining.float() / s.max_output_tokens).unsqueeze(-1),
            "active": (f.queue > 0).float().unsqueeze(-1),
            "acc": f.acceptance.unsqueeze(-1),
            "out": (f.outstanding.clamp(max=10.0) / 5.0).unsqueeze(-1),
            "lat": (f.token_latency_ms.clamp(max=500.0) / 100.0).unsqueeze(-1),
        }

    def _server_feats(self, f: Features) -> torch.Tensor:
        s = self.spec
        return torch.cat([f.srv_users.float() / s.n_users, f.srv_queued_tokens.float() / s.verify_token_budget,
                          f.srv_busy.float()], -1)  # [B, 3M]

    def local(self, f: Features) -> torch.Tensor:
        """[B, N, obs_dim] float32 local observations, agent id one-hot last."""
        u = self._user_feats(f)
        B, N = f.server.shape
        srv = self._server_feats(f).unsqueeze(1).expand(B, N, -1)
        tf = f.time_frac.view(B, 1, 1).expand(B, N, 1)
        eye = self._eye.to(f.server.device).expand(B, N, N)
        parts = [u["snr"], u["rate"], u["srv"], u["draft"], u["power"], u["gmax"], u["queue"], u["rem"],
                 u["active"], u["acc"], u["out"], u["lat"], tf, srv, eye]
        return torch.cat(parts, -1).float()

    def state(self, f: Features) -> torch.Tensor:
        """[B, state_dim] global state for the centralized critic."""
        u = self._user_feats(f)
        B = f.server.shape[0]
        best_snr = u["snr"].max(-1, keepdim=True).values
        per_user = torch.cat([u["srv"], u["queue"], u["rem"], u["draft"], u["acc"], best_snr], -1)
        return torch.cat([self._server_feats(f), per_user.reshape(B, -1), f.time_frac.view(B, 1)], -1).float()


def decode_local(obs: torch.Tensor, spec: ObsSpec) -> dict[str, torch.Tensor]:
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
        "ul_mbps": torch.expm1(out["ul_mbps"] * 5.0),
        "server": out["server_onehot"].argmax(-1) if M > 1 else torch.zeros(obs.shape[:-1], dtype=torch.long),
        "draft_ms": out["draft_ms"] * 50.0,
        "power_w": out["power_w"] * 40.0,
        "max_gamma": torch.round(out["max_gamma"] * spec.gamma_max).long(),
        "queue": torch.round(out["queue"] * spec.queue_capacity),
        "remaining": out["remaining"] * spec.max_output_tokens,
        "acceptance": out["acceptance"],
        "outstanding": out["outstanding"] * 5.0,
        "token_latency_ms": out["token_latency_ms"] * 100.0,
        "srv_users": out["srv_users"] * spec.n_users,
        "srv_queued_tokens": out["srv_queued_tokens"] * spec.verify_token_budget,
        "srv_busy": out["srv_busy"],
    }
