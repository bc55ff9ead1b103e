"""Scenario: hexagonal server layout, user drops, device classes, task mix, workload, mobility.

Everything here is sampled from the simulator's own `torch.Generator`, batched over
[B environments, N users], so a scenario draw never touches global RNG state.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from marl_sd.config import ConfigError, ScenarioConfig
from marl_sd.envs.draws import as_draws
from marl_sd.model.profiles import LatencyProfile


def hex_sites(n: int, isd: float) -> torch.Tensor:
    """First `n` sites of a hexagonal lattice with inter-site distance `isd`, centre first."""
    pts = [(0.0, 0.0)]
    ring = 1
    dirs = [(math.cos(math.pi / 3 * k + math.pi / 6), math.sin(math.pi / 3 * k + math.pi / 6)) for k in range(6)]
    while len(pts) < n:
        # walk ring `ring`: start at ring * dir[4], then `ring` steps along each of the 6 directions
        x, y = ring * isd * dirs[4][0], ring * isd * dirs[4][1]
        for side in range(6):
            dx, dy = dirs[side]
            for _ in range(ring):
                pts.append((x, y))
                x, y = x + isd * dx, y + isd * dy
        ring += 1
    return torch.tensor(pts[:n], dtype=torch.float32)


class Scenario:
    """Static description of one scenario plus batched samplers for its random parts."""

    def __init__(self, cfg: ScenarioConfig, profile: LatencyProfile, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.profile = profile
        self.device = torch.device(device)
        self.N, self.M = cfg.n_users, cfg.n_servers
        self.cell_xy = hex_sites(self.M, cfg.isd_m).to(self.device)  # where users are dropped
        pos, self.site_tx_dbm, self.site_bandwidth_mhz = cfg.site_radio()
        self.bs_xy = torch.stack(
            [
                self.cell_xy[m] if p is None else torch.tensor(p, dtype=torch.float32, device=self.device)
                for m, p in enumerate(pos)
            ]
        )  # where the sites are
        self.cell_radius = cfg.isd_m / math.sqrt(3.0)

        missing = [d.name for d in cfg.devices if d.name not in profile.devices]
        if missing:
            raise ConfigError(
                f"scenario.devices: {missing} not in latency profile '{profile.name}' (available: {sorted(profile.devices)})"
            )
        devs = [profile.devices[d.name] for d in cfg.devices]
        self.device_names = [d.name for d in cfg.devices]
        f = dict(dtype=torch.float32, device=self.device)
        self.dev_share = torch.tensor([d.share for d in cfg.devices], **f)
        self.dev_draft_ms = torch.tensor([d.draft_ms_per_token for d in devs], **f)
        self.dev_power_w = torch.tensor([d.power_w for d in devs], **f)
        self.dev_max_gamma = torch.tensor([d.max_gamma for d in devs], dtype=torch.long, device=self.device)
        self.dev_alpha_scale = torch.tensor([d.alpha_scale for d in devs], **f)
        self.task_names = [t.name for t in cfg.tasks]
        self.task_share = torch.tensor([t.share for t in cfg.tasks], **f)
        self.task_alpha = torch.tensor([t.alpha for t in cfg.tasks], **f)

    # ---- drops -------------------------------------------------------------------------------
    def sample_points(self, shape: tuple[int, ...], gen, site: str = "pts") -> torch.Tensor:
        """Uniform points in the union of the hexagonal cells (exact: cell, then rhombus)."""
        d = as_draws(gen)
        cell = d.randint(0, self.M, shape, self.device, site=site + ".cell")
        rh = d.randint(0, 3, shape, self.device, site=site + ".rh").float()
        u = d.rand(shape, self.device, site=site + ".u")
        v = d.rand(shape, self.device, site=site + ".v")
        # the hexagon (vertices at 0, 60, ... deg) is three rhombi {0, v_2k, v_2k+1, v_2k+2}
        a = rh * (2 * math.pi / 3)
        b = a + 2 * math.pi / 3
        r = self.cell_radius
        x = r * (u * torch.cos(a) + v * torch.cos(b))
        y = r * (u * torch.sin(a) + v * torch.sin(b))
        return self.cell_xy[cell] + torch.stack([x, y], -1)

    def sample_devices(self, B: int, gen) -> torch.Tensor:
        """Device class index per user, [B, N]."""
        return as_draws(gen).multinomial(self.dev_share.expand(B, -1), self.N, site="dev")

    def requests_from_uniform(self, u: torch.Tensor, dev_idx: torch.Tensor) -> torch.Tensor:
        """Map uniforms [..., 3] to request attributes [..., 3] = (prompt tokens, output tokens, alpha).

        Drawing the uniforms when a request *arrives* (not when its service starts) keeps the
        workload identical across policies for the same seed (common random numbers).
        """
        w = self.cfg.workload
        lo_p, hi_p = w.prompt_tokens.low, w.prompt_tokens.high
        lo_o, hi_o = w.output_tokens.low, w.output_tokens.high
        prompt = (lo_p + torch.floor(u[..., 0] * (hi_p - lo_p + 1))).clamp(max=hi_p)
        out = (lo_o + torch.floor(u[..., 1] * (hi_o - lo_o + 1))).clamp(max=hi_o)
        cum = torch.cumsum(self.task_share / self.task_share.sum(), 0)
        task = torch.searchsorted(cum, u[..., 2].contiguous()).clamp(max=len(self.task_names) - 1)
        alpha = (self.task_alpha[task] * self.dev_alpha_scale[dev_idx]).clamp(0.0, 0.99)
        return torch.stack([prompt, out, alpha], -1)

    def sample_speeds(self, shape: tuple[int, ...], gen) -> torch.Tensor:
        lo, hi = self.cfg.mobility.speed_mps
        return lo + (hi - lo) * as_draws(gen).rand(shape, self.device, site="speed")

    def move(self, pos, waypoint, speed, dt_s: float, gen):
        """Random-waypoint step; returns new positions, waypoints and the distance moved [B, N]."""
        if self.cfg.mobility.model == "static":
            return pos, waypoint, torch.zeros(pos.shape[:-1], device=pos.device)
        delta = waypoint - pos
        dist = delta.norm(dim=-1)
        step = (speed * dt_s).clamp(max=dist)
        new = pos + delta * (step / dist.clamp(min=1e-6)).unsqueeze(-1)
        arrived = dist <= speed * dt_s
        if bool(arrived.any()):
            fresh = self.sample_points(tuple(pos.shape[:-1]), gen, site="waypoint")
            waypoint = torch.where(arrived.unsqueeze(-1), fresh, waypoint)
        return new, waypoint, step


def poisson_schedule(w, n_users: int, duration_s: float, seed: int) -> list[list[tuple[float, int, int]]]:
    """A concrete workload for a live run: per user, Poisson arrivals over `duration_s` at the
    workload's rate, with prompt and output lengths uniform over its ranges (numpy, seeded per
    user). The simulator can replay it (`BatchedSimulator.replay_workload`)."""

    out = []
    for n in range(n_users):
        rng = np.random.default_rng([seed, n])
        reqs, t = [], 0.0
        while True:
            t += rng.exponential(1.0 / w.arrival_rate_per_s)
            if t >= duration_s:
                break
            reqs.append(
                (
                    round(float(t), 6),
                    int(rng.integers(w.prompt_tokens.low, w.prompt_tokens.high + 1)),
                    int(rng.integers(w.output_tokens.low, w.output_tokens.high + 1)),
                )
            )
        out.append(reqs)
    return out


def site_conditions(events, n_servers: int, t_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Each site's batch-time factor [M] and down state [M] at episode time `t_s` under
    `scenario.site_events` (the simulator reads them at each slot start; the bound per slot)."""
    factor, down = np.ones(n_servers), np.zeros(n_servers, dtype=bool)
    for e in events:
        if e.start_s <= t_s < e.end_s:
            factor[e.site] *= e.slowdown
            down[e.site] |= e.down
    return factor, down


def moved_events(events, jitter_s: float, gen: torch.Generator) -> list:
    """`events`, each moved by its own uniform offset in [-jitter_s, +jitter_s] s, its length kept
    and its start never before 0 (`scenario.site_event_jitter_s`)."""
    off = (torch.rand(len(events), generator=gen, dtype=torch.float64) * 2.0 - 1.0) * jitter_s
    out = []
    for e, o in zip(events, off.tolist(), strict=True):
        o = max(o, -e.start_s)
        out.append(e.model_copy(update={"start_s": e.start_s + o, "end_s": e.end_s + o}))
    return out
