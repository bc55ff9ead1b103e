"""Policies by name, as `marl-sd eval` and `marl-sd bench suite` ask for them: a heuristic,
`oracle` (the search oracle with `eval.oracle`), or `learned` (the best checkpoint of a run)."""
from __future__ import annotations

from pathlib import Path

from marl_sd.agents.heuristics import HEURISTICS, make_heuristic
from marl_sd.agents.oracle import SearchOracle
from marl_sd.agents.policy import LearnedPolicy, Policy, PolicyContext
from marl_sd.agents.train import load_policy, policy_checkpoint
from marl_sd.config import Config, ConfigError


def check_policy_fits(policy, ctx: PolicyContext, source) -> None:
    """A clear error unless a trained policy can act in this scenario: any number of users, at
    most the servers it has room for, the same feature table and action layout."""
    room, spec = policy.max_servers, ctx.spec
    if spec.n_servers > room:
        raise ConfigError(f"{source} has room for {room} servers (env.max_servers when trained); this scenario has "
                          f"{spec.n_servers}: train with env.max_servers >= {spec.n_servers}")
    if room != spec.max_servers:
        raise ConfigError(f"{source} was trained with env.max_servers={room}; set env.max_servers={room} "
                          f"(this config has {spec.max_servers})")
    if policy.obs_dim != spec.obs_dim or list(policy.action_space.nvec) != ctx.nvec:
        raise ConfigError(f"{source} was trained for a {policy.obs_dim}-wide observation and actions "
                          f"{list(policy.action_space.nvec)}; this config has {spec.obs_dim} and {ctx.nvec} "
                          "(another feature table, gamma_max or bid levels)")


def make_policy(name: str, cfg: Config, run_dir: Path | None = None, learned_name: str | None = None) -> Policy | None:
    """The policy `name` for scenario `cfg`; `learned` is None when `run_dir` has no checkpoint,
    and a clear error when its checkpoint was trained for other sizes."""
    ctx = PolicyContext.from_config(cfg)
    if name == "oracle":
        return SearchOracle(ctx, **cfg.eval.oracle.model_dump())
    if name == "learned":
        ckpt = policy_checkpoint(run_dir) if run_dir is not None else None
        if ckpt is None:
            return None
        policy = load_policy(ckpt)
        check_policy_fits(policy, ctx, ckpt)
        return LearnedPolicy(ctx, policy, name=learned_name or cfg.train.algorithm)
    if name not in HEURISTICS:
        raise KeyError(f"unknown policy '{name}' (heuristics: {', '.join(HEURISTICS)}; or oracle, learned)")
    return make_heuristic(name, ctx)
