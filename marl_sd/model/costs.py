"""One cost model of a speculative round, shared by the simulator and the heuristics' latency
prediction so they cannot drift apart: message sizes, per-message latency (including the
transport cost the served-profile calibration fits) and the client's pre-drafting rule.

Loads without torch (the live controller predicts latencies with numpy arrays); torch is
imported where torch tensors are made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from marl_sd.config import Config
from marl_sd.model.profiles import LatencyProfile, load_profile

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MessageCosts:
    """Bytes and fixed latency of the messages of a round."""

    header_bytes: float
    token_id_bytes: float
    draft_token_bytes: float  # one drafted token: its id + the top-k (id, prob) pairs
    message_ms: float  # per message: air interface + core (scenario) + software transport (profile)

    @classmethod
    def of(cls, cfg: Config, profile: LatencyProfile) -> MessageCosts:
        pay = profile.payload
        return cls(
            header_bytes=float(pay.header_bytes),
            token_id_bytes=float(pay.token_id_bytes),
            draft_token_bytes=float(pay.token_id_bytes + cfg.scenario.topk * pay.topk_pair_bytes),
            message_ms=cfg.scenario.channel.base_latency_ms + profile.transport.per_message_ms,
        )

    def upload_bytes(self, gamma):
        """A round's upload: gamma drafted tokens with their top-k distributions."""
        return self.header_bytes + gamma * self.draft_token_bytes

    def ids_bytes(self, n):
        """A message of n token ids: a prompt, a context handed over, a round's result."""
        return self.header_bytes + n * self.token_id_bytes


def expected_tokens_per_round(alpha, gamma):
    """E[N] = (1 - a^(g+1)) / (1 - a) with i.i.d. matches at rate a."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def drafts_after_round(
    extra: torch.Tensor,
    gamma: torch.Tensor,
    flight_ms: torch.Tensor,
    draft_ms: torch.Tensor,
    keep: torch.Tensor,
    predraft: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafting client's pre-drafting rule (`Drafter.commit`), for tensors of rounds.

    A round uploaded `gamma` drafts with `extra` more already drafted past them; while it was in
    flight for `flight_ms` the device drafted whole tokens up to gamma + 1 past the uploaded ones
    (none in an autoregressive round, gamma = 0).
    `keep`: the round was fully accepted and the first draft past it equals the target's bonus
    token. Then that token is used up as the bonus and the rest start the next round.
    Returns (drafts ahead of the committed text, ms spent drafting in flight)."""
    import torch

    if predraft:
        room = ((gamma + 1 - extra) * (gamma > 0)).clamp(min=0)  # no pre-drafting for gamma = 0
        made = extra + torch.minimum(torch.floor(flight_ms / draft_ms), room)
        drafted_ms = torch.minimum(flight_ms, room * draft_ms)
    else:
        made, drafted_ms = extra, torch.zeros_like(flight_ms)
    return (made - 1).clamp(min=0) * keep, drafted_ms  # made >= 0 is whole


def expected_predraft_kept(alpha, gamma, flight_ms, draft_ms):
    """`drafts_after_round` in expectation over i.i.d. matches: whole tokens drafted in
    flight (at most gamma + 1), kept when all gamma drafts and the bonus position match, one used
    up as the bonus. Works on floats, numpy arrays and torch tensors."""
    if _is_torch(flight_ms) or _is_torch(gamma):
        import torch

        made = torch.minimum(torch.floor(flight_ms / draft_ms), torch.as_tensor(gamma + 1.0))
        return alpha ** (gamma + 1) * (made - 1).clamp(min=0) * (torch.as_tensor(gamma) > 0)
    if isinstance(flight_ms, np.ndarray) or isinstance(gamma, np.ndarray):
        made = np.minimum(np.floor(flight_ms / draft_ms), np.asarray(gamma) + 1.0)
        return alpha ** (gamma + 1) * (made - 1).clip(min=0) * (np.asarray(gamma) > 0)
    made = min(math.floor(flight_ms / draft_ms), gamma + 1)
    return alpha ** (gamma + 1) * max(made - 1, 0) if gamma > 0 else 0.0


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


@dataclass(frozen=True)
class SiteCosts:
    """Per-server verification cost T(b, K) = t0 + c_b b + c_N max(0, K - knee), prefill cost
    per token and KV capacity ([M] torch tensors, or numpy arrays for torch-free callers):
    heterogeneous sites, or M alike."""

    t0_ms: torch.Tensor
    c_b_ms: torch.Tensor
    c_n_ms: torch.Tensor
    n_knee: torch.Tensor
    prefill_ms_per_token: torch.Tensor
    kv_capacity: torch.Tensor  # inf: unlimited

    @classmethod
    def of(cls, cfg: Config, device=None, numpy: bool = False) -> SiteCosts:
        tg = [load_profile(p).target for p in cfg.scenario.site_profiles()]
        if numpy:
            t = lambda xs: np.asarray(xs, dtype=np.float32)  # noqa: E731
        else:
            import torch

            t = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
        caps = [math.inf if c is None else float(c) for c in cfg.scenario.site_kv_capacity()]
        return cls(
            t([x.verify.t0_ms for x in tg]),
            t([x.verify.c_b_ms for x in tg]),
            t([x.verify.c_n_ms for x in tg]),
            t([x.verify.n_knee for x in tg]),
            t([x.prefill.ms_per_token for x in tg]),
            t(caps),
        )

    def verify_ms(self, b, k, server_dim: int = -1):
        """T(b, K) with the server axis of `b` and `k` at `server_dim` (broadcast)."""
        shape = [1] * (-server_dim)
        shape[0] = -1
        p = [x.reshape(shape) for x in (self.t0_ms, self.c_b_ms, self.c_n_ms, self.n_knee)]
        return p[0] + p[1] * b + p[2] * (k - p[3]).clip(min=0.0)

    @property
    def homogeneous(self) -> bool:
        return all(
            bool((x == x[0]).all()) for x in (self.t0_ms, self.c_b_ms, self.c_n_ms, self.n_knee, self.prefill_ms_per_token)
        )
