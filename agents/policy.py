"""One policy interface for learned and heuristic policies.

`act(obs, mask)` takes local observations [B, N, obs_dim] and flat action masks
[B, N, sum(nvec)] for all users of B environments and returns actions [B, N, 4]. Decentralized
policies act on each row alone; centralized heuristics (marked `centralized = True`) may look
at every user of the same environment, as the methods they reproduce do.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from marl_sd.config import Config
from marl_sd.envs.observation import ObsSpec, action_nvec
from marl_sd.envs.profiles import LatencyProfile, load_profile


@dataclass
class PolicyContext:
    """Static knowledge a policy may use: sizes, action layout, scenario and latency profile."""

    cfg: Config
    spec: ObsSpec
    nvec: list[int]
    profile: LatencyProfile

    @classmethod
    def from_config(cls, cfg: Config) -> "PolicyContext":
        return cls(cfg, ObsSpec.from_config(cfg), action_nvec(cfg), load_profile(cfg.scenario.profile))


def split_mask(mask: torch.Tensor, nvec: list[int]) -> list[torch.Tensor]:
    return list(torch.split(mask.bool(), list(nvec), dim=-1))


def masked_argmax(logits: torch.Tensor, mask: torch.Tensor, nvec: list[int]) -> torch.Tensor:
    z = torch.where(mask.bool(), logits, torch.finfo(logits.dtype).min)
    return torch.stack([p.argmax(-1) for p in torch.split(z, list(nvec), dim=-1)], -1)


def masked_sample(logits: torch.Tensor, mask: torch.Tensor, nvec: list[int], gen: torch.Generator | None = None) -> torch.Tensor:
    z = torch.where(mask.bool(), logits, torch.finfo(logits.dtype).min)
    out = []
    for p in torch.split(z, list(nvec), dim=-1):
        probs = torch.softmax(p, -1).reshape(-1, p.shape[-1])
        out.append(torch.multinomial(probs, 1, generator=gen).view(p.shape[:-1]))
    return torch.stack(out, -1)


class Policy(ABC):
    name: str = "policy"
    centralized: bool = False
    description: str = ""

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx

    def reset(self, seed: int | None = None) -> None:
        """Called at the start of each evaluation episode batch."""

    @abstractmethod
    def act(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class LearnedPolicy(Policy):
    """A trained MAPPO/IPPO actor (torch); deterministic = masked argmax of the logits."""

    centralized = False

    def __init__(self, ctx: PolicyContext, sb3_policy, name: str = "mappo", deterministic: bool = True):
        super().__init__(ctx)
        self.policy = sb3_policy
        self.name = name
        self.deterministic = deterministic
        self.description = "learned actor on the local observation (decentralized execution)"
        self.gen = torch.Generator()

    def reset(self, seed=None):
        if seed is not None:
            self.gen.manual_seed(seed)

    @torch.no_grad()
    def act(self, obs, mask):
        dev = self.policy.device
        logits = self.policy.actor_logits(obs.to(dev).reshape(-1, obs.shape[-1]).float()).cpu()
        m = mask.reshape(-1, mask.shape[-1])
        nv = self.ctx.nvec
        a = masked_argmax(logits, m, nv) if self.deterministic else masked_sample(logits, m, nv, self.gen)
        return a.view(*obs.shape[:-1], len(nv))


class DelayedPolicy(Policy):
    """Applies the decision `slots` control slots old, as a live controller does whose decisions
    reach the devices a report later; a stale sub-action the current mask forbids (a server
    out of coverage by now) is replaced by the fresh one."""

    def __init__(self, policy: Policy, slots: int):
        super().__init__(policy.ctx)
        self.policy, self.slots = policy, slots
        self.name, self.centralized, self.description = policy.name, policy.centralized, policy.description
        self.pending: list[torch.Tensor] = []

    def reset(self, seed: int | None = None) -> None:
        self.policy.reset(seed)
        self.pending = []

    def act(self, obs, mask):
        fresh = self.policy.act(obs, mask)
        self.pending.append(fresh)
        if len(self.pending) <= self.slots:
            return fresh
        stale = self.pending.pop(0)
        ok = torch.stack([m.gather(-1, stale[..., k: k + 1]).squeeze(-1)
                          for k, m in enumerate(split_mask(mask, self.ctx.nvec))], -1)
        return torch.where(ok, stale, fresh)
