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
from marl_sd.contract import ActionLayout, ObsSpec, TurnOrder
from marl_sd.model.observation import ObservationBuilder, reencode
from marl_sd.model.profiles import LatencyProfile, load_profile


@dataclass
class PolicyContext:
    """Static knowledge a policy may use: sizes, action layout, scenario and latency profile."""

    cfg: Config
    spec: ObsSpec
    actions: ActionLayout
    profile: LatencyProfile

    @classmethod
    def from_config(cls, cfg: Config, spec: ObsSpec | None = None) -> PolicyContext:
        """`spec`: the observation contract observations arrive in, when not the config's own
        (a simulator encoding for a policy trained across physics)."""
        spec = ObsSpec.from_config(cfg) if spec is None else spec
        return cls(cfg, spec, ActionLayout.from_config(cfg), load_profile(cfg.scenario.profile))

    @property
    def nvec(self) -> list[int]:
        return self.actions.nvec

    def split(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per sub-action bool masks by name, the server mask cut to the scenario's servers (the
        action has room for `max_servers`; heuristics reason about the servers that exist)."""
        parts = self.actions.named(mask.bool())
        parts["server"] = parts["server"][..., : self.spec.n_servers]
        return parts


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


class OwnContract:
    """A scenario's observations and masks re-expressed in the contract an actor was made with:
    re-encoded with `builder` (the actor's feature table and constants, at the scenario's
    server count) and the server mask widened to the actor's room. Used by a trained policy and
    by a bundle run in the simulator, as the live controller encodes for a bundle."""

    def __init__(self, ctx: PolicyContext, builder: ObservationBuilder):
        self.ctx, self.builder = ctx, builder
        self.actions = ctx.actions.with_size(server=builder.spec.max_servers)

    def __call__(self, obs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.ctx.actions.named(mask)
        srv = parts["server"]
        pad = torch.zeros(*mask.shape[:-1], self.actions.size("server") - srv.shape[-1], dtype=mask.dtype)
        parts["server"] = torch.cat([srv, pad], -1)
        return reencode(obs, self.ctx.spec, self.builder), self.actions.join(parts)


class LearnedPolicy(Policy):
    """A trained MAPPO/IPPO actor (torch); deterministic = masked argmax of the logits (of a joint
    head: the best allowed joint action, as it was trained; its exported bundle ships the
    max-marginals instead).

    `own_spec`: the contract the actor was trained with (its room for servers and its
    normalization constants), when it differs from the scenario's: observations are re-encoded
    with it and masks widened to its room, as the live controller does with a bundle."""

    centralized = False

    def __init__(
        self, ctx: PolicyContext, sb3_policy, name: str = "mappo", deterministic: bool = True, own_spec: ObsSpec | None = None
    ):
        super().__init__(ctx)
        self.policy = sb3_policy
        self.name = name
        self.deterministic = deterministic
        self.description = "learned actor on the local observation (decentralized execution)"
        self.gen = torch.Generator()
        own = own_spec.at(ctx.spec.n_servers) if own_spec is not None else ctx.spec
        self.own = OwnContract(ctx, ObservationBuilder(own)) if own != ctx.spec else None
        self.turns = TurnOrder(own) if own.in_turn else None
        if own.in_turn:
            self.description = "learned actor on the local observation, users deciding in turn (env.in_turn)"

    def reset(self, seed=None):
        if seed is not None:
            self.gen.manual_seed(seed)

    def inputs(self, obs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scenario's observation and mask as the actor reads them (its own contract)."""
        return self.own(obs, mask) if self.own is not None else (obs, mask)

    @torch.no_grad()
    def act(self, obs, mask):
        act = self.ctx.actions if self.own is None else self.own.actions
        obs, mask = self.inputs(obs, mask)
        dev = self.policy.device
        x = obs.to(dev).reshape(-1, obs.shape[-1]).float()
        m = mask.reshape(-1, mask.shape[-1])
        if getattr(self.policy, "joint_head", False) and self.deterministic:  # the joint policy itself
            a = act.joint_masked_argmax(self.policy.joint_scores(x).cpu(), m)
            return a.view(*obs.shape[:-1], len(act.nvec))
        if self.deterministic:
            pick = act.masked_argmax
        else:
            pick = lambda z, mm: act.masked_sample(z, mm, self.gen)  # noqa: E731
        if self.turns is not None:
            a, _ = self.turns.decide(obs.float(), mask, lambda r: self.policy.actor_logits(r.to(dev)).cpu(), pick)
            return a
        a = pick(self.policy.actor_logits(x).cpu(), m)
        return a.view(*obs.shape[:-1], len(act.nvec))


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
        return torch.where(self.ctx.actions.allowed(stale, mask), stale, fresh)
