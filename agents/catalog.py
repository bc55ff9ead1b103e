"""Policies by name, as `marl-sd eval` and `marl-sd bench suite` ask for them: a heuristic,
`oracle` (the search oracle with `eval.oracle`), or `learned` (the best checkpoint of a run)."""
from __future__ import annotations

from pathlib import Path

from marl_sd.agents.heuristics import HEURISTICS, make_heuristic
from marl_sd.agents.oracle import SearchOracle
from marl_sd.agents.policy import LearnedPolicy, Policy, PolicyContext
from marl_sd.agents.train import load_policy, policy_checkpoint
from marl_sd.config import Config, ConfigError


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
        if policy.obs_dim != ctx.spec.obs_dim or list(policy.action_space.nvec) != ctx.nvec:
            raise ConfigError(f"{ckpt} was trained for a {policy.obs_dim}-wide observation and actions "
                              f"{list(policy.action_space.nvec)}; this config has {ctx.spec.obs_dim} and {ctx.nvec} "
                              f"({ctx.spec.n_users} users, {ctx.spec.n_servers} servers): a learned policy runs "
                              "only at the sizes it was trained for (evaluate heuristics with --policies ...)")
        return LearnedPolicy(ctx, policy, name=learned_name or cfg.train.algorithm)
    if name not in HEURISTICS:
        raise KeyError(f"unknown policy '{name}' (heuristics: {', '.join(HEURISTICS)}; or oracle, learned)")
    return make_heuristic(name, ctx)
