"""The latency model: predicted per-token latency [.., M, G] of every (server, gamma) choice for
every user, from what a user can measure and the sites' profiles.

Round = draft (minus the drafts the client's pre-drafting rule keeps, in expectation) + uplink +
queueing + T(b, K) + downlink, with the simulator's own message costs (`marl_sd.model.costs`);
per token = round / E[N], E[N] = (1 - a^(g+1)) / (1 - a). gamma = 0 is one server decode step
(plus queueing) per token.

Leaving the current server mid-request costs a handover: the session's context is uploaded to
the new site and prefilled there. That cost, spread over the request's tokens left, is added to
every other server's prediction (`handover_ms`), so a move must gain more than it costs.

Two users of it: the heuristics (static knowledge only: the context is estimated from the
workload's mean prompt and output lengths, sites run at their profile's speed), and the
observation's candidate features (`measured=True`: the user's real context length and each
site's measured slowdown), which the simulator computes with torch and the live controller with
numpy, so this module loads without torch.
"""

from __future__ import annotations

import numpy as np

from marl_sd.config import Config
from marl_sd.model.costs import MessageCosts, SiteCosts, expected_predraft_kept, expected_tokens_per_round
from marl_sd.model.profiles import load_profile


def _xp(x):
    """The array module of `x`: torch for torch tensors, else numpy."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


def take_last(x, idx):
    """`x[..., idx]` along the last axis, per element (`idx` has x's shape with a last axis of 1):
    torch's take_along_dim or numpy's take_along_axis."""
    return np.take_along_axis(x, idx, -1) if isinstance(x, np.ndarray) else x.gather(-1, idx)


class LatencyModel:
    """Predicts per-token latencies; `f` maps `Features` field names to arrays in physical units
    (user quantities [B, N], per-(user, server) and per-server quantities [B, N, M] or
    broadcastable to it). Torch tensors or numpy arrays."""

    def __init__(
        self,
        sites: SiteCosts,
        costs: MessageCosts,
        gamma_max: int,
        mean_prompt: float,
        mean_output: float,
        handover_cost: bool = True,
        measured: bool = False,
    ):
        self.sites, self.costs = sites, costs
        self.base = costs.message_ms
        self.G = gamma_max + 1
        self.mean_prompt, self.mean_output = mean_prompt, mean_output
        self.handover_cost, self.measured = handover_cost, measured

    @classmethod
    def of(cls, cfg: Config, handover_cost: bool = True, measured: bool = False, numpy: bool = False, device=None):
        w = cfg.scenario.workload
        return cls(
            SiteCosts.of(cfg, device, numpy=numpy),
            MessageCosts.of(cfg, load_profile(cfg.scenario.profile)),
            cfg.env.gamma_max,
            (w.prompt_tokens.low + w.prompt_tokens.high) / 2,
            (w.output_tokens.low + w.output_tokens.high) / 2,
            handover_cost,
            measured,
        )

    def handover_ms(self, f: dict, at):
        """[B, N, M] per-token cost of moving the active request to each server now: upload of the
        context at that server's rate plus its prefill there, over the tokens left (0 at the
        current server and for an idle user); `at` [B, N, M] one-hot of each user's server."""
        remaining = f["remaining"] * 1.0
        if self.measured:
            ctx = f["context_tokens"] * 1.0
        else:
            ctx = self.mean_prompt + (self.mean_output - remaining).clip(min=0.0)
        rate = (f["ul_mbps"] * 125.0).clip(min=1e-3)  # bytes per ms
        prefill = self.sites.prefill_ms_per_token
        if self.measured:
            prefill = prefill * f["srv_slowdown"]
        move = self.costs.ids_bytes(ctx)[..., None] / rate + ctx[..., None] * prefill
        active = ((f["queue"] > 0) & (remaining > 0))[..., None] * 1.0
        return move * (1 - at) * active / remaining.clip(min=1.0)[..., None]

    def predict(self, f: dict, users_at=None, share_scale=None, alpha=None, hysteresis: float = 0.0):
        """users_at [B, M]: users served per server (default: observed); share_scale [B, N, M]
        multiplies the observed uplink rate (a different bandwidth split); `hysteresis` inflates
        the latency of leaving the current server while a request is active (handover cost)."""
        xp = _xp(f["ul_mbps"])
        g = xp.arange(self.G, dtype=xp.float32)
        a = (f["acceptance"] if alpha is None else alpha).clip(0.01, 0.99)[..., None, None]
        e_n = expected_tokens_per_round(a, g)  # [B, N, 1, G]
        rate = (f["ul_mbps"] * 125.0).clip(min=1e-3)  # bytes per ms, [B, N, M]
        if share_scale is not None:
            rate = rate * share_scale
        M = rate.shape[-1]
        # per-server loads as each user observes them: [B, N, M]
        b = f["srv_users"] if users_at is None else users_at[:, None, :]
        at = (f["server"][..., None] == xp.arange(M)) * 1.0
        b_i = (b + (1 - at)).clip(min=1)  # including me
        k = f["srv_queued_tokens"][..., None] + g + 1
        t_ver = self.sites.verify_ms(b_i[..., None], k, server_dim=-2)  # [B, N, M, G]
        if self.measured:
            t_ver = t_ver * f["srv_slowdown"][..., None]
        # queueing behind the others: at its own server a user's own rounds are part of the busy
        # time it sees, so only the others' share of it delays it (else every server it leaves
        # looks free and it moves back and forth)
        others = xp.where(at > 0, (b - 1).clip(min=0) / b.clip(min=1), 1.0)
        wait = (f["srv_busy"] * others)[..., None] * t_ver / 2  # srv_busy as each user observes it: [B, N, M]
        up = self.costs.upload_bytes(g) / rate[..., None] + self.base
        down = self.base + self.costs.ids_bytes(e_n) / rate[..., None]
        t_d = f["draft_ms"][..., None, None]
        inflight = up + wait + t_ver + down
        kept = expected_predraft_kept(a, g, inflight, t_d)
        spec = (g * t_d - kept * t_d + inflight) / e_n
        lat = xp.where(g == 0, t_ver + wait, spec)
        if self.handover_cost:
            lat = lat + self.handover_ms(f, at)[..., None]
        if hysteresis:
            leave = (1 - at) * (f["queue"] > 0)[..., None]
            lat = lat * (1 + hysteresis * leave)[..., None]
        return lat

    def best(self, f: dict):
        """Per (user, server): the lowest predicted per-token latency over the gammas the user's
        device allows, and that gamma. ([B, N, M] each.)"""
        xp = _xp(f["ul_mbps"])
        lat = self.predict(f)
        ok = xp.arange(self.G) <= f["max_gamma"][..., None, None]
        lat = xp.where(ok, lat, float("inf"))
        gamma = lat.argmin(-1)
        return take_last(lat, gamma[..., None])[..., 0], gamma
