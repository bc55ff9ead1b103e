"""Policies by name, as `marl-sd eval` and `marl-sd bench suite` ask for them: a heuristic,
`oracle` (the search oracle with `eval.oracle`; policy improvement, not a bound), `bound` (every
user served alone: a bound from below, `marl_sd.agents.bound`), `oracle_clairvoyant` (the same search scored on
the real future draws: needs `env.rng: counter`), or `learned` (the best checkpoint of a run)."""

from __future__ import annotations

from pathlib import Path

from marl_sd.agents.bound import SoloBound
from marl_sd.agents.heuristics import HEURISTICS, make_heuristic
from marl_sd.agents.oracle import SearchOracle
from marl_sd.agents.policy import LearnedPolicy, Policy, PolicyContext
from marl_sd.agents.train import load_policy, policy_checkpoint
from marl_sd.config import Config, ConfigError, load_config
from marl_sd.contract import ActionLayout, ObsSpec


def check_policy_fits(policy, own: ObsSpec, ctx: PolicyContext, source) -> None:
    """A clear error unless a trained policy (trained with contract `own`) can act in this
    scenario: any number of users, at most the servers it has room for, the same feature table
    and the same bid, priority and gamma choices. Normalization constants and room may differ
    (`LearnedPolicy` re-encodes)."""
    room, spec = policy.max_servers, ctx.spec
    if spec.n_servers > room:
        raise ConfigError(
            f"{source} has room for {room} servers (env.max_servers when trained); this scenario has "
            f"{spec.n_servers}: train with env.max_servers >= {spec.n_servers}"
        )
    if policy.obs_dim != own.obs_dim or room != own.max_servers:
        raise ConfigError(
            f"{source} expects a {policy.obs_dim}-wide observation; its run's config describes "
            f"{own.obs_dim} (a run of another package version: retrain)"
        )
    theirs = {k: v for k, v in ActionLayout(policy.action_space.nvec).sizes().items() if k != "server"}
    ours = {k: v for k, v in ctx.actions.sizes().items() if k != "server"}
    if theirs != ours:
        raise ConfigError(
            f"{source} chooses bids, priorities and gamma from {theirs}; this config has {ours} (other bid levels or gamma_max)"
        )


POLICY_NAMES = ("bound", "oracle", "oracle_clairvoyant", "learned")


def check_policy_name(name: str) -> None:
    """A clear error for a policy name that is neither a heuristic nor one of `POLICY_NAMES`."""
    if name not in HEURISTICS and name not in POLICY_NAMES:
        raise ConfigError(f"unknown policy '{name}' (heuristics: {', '.join(HEURISTICS)}; or {', '.join(POLICY_NAMES)})")


def make_policy(name: str, cfg: Config, run_dir: Path | None = None, learned_name: str | None = None) -> Policy | None:
    """The policy `name` for scenario `cfg`; `learned` is None when `run_dir` has no checkpoint,
    and a clear error when its checkpoint was trained for other sizes."""
    ctx = PolicyContext.from_config(cfg)
    check_policy_name(name)
    if name == "bound":
        return SoloBound(ctx)
    if name in ("oracle", "oracle_clairvoyant"):
        return SearchOracle(ctx, **cfg.eval.oracle.model_dump(), clairvoyant=name == "oracle_clairvoyant")
    if name == "learned":
        ckpt = policy_checkpoint(run_dir) if run_dir is not None else None
        if ckpt is None:
            return None
        policy = load_policy(ckpt)
        run_cfg = Path(run_dir) / "config.yaml"
        own = ObsSpec.from_config(load_config(run_cfg)) if run_cfg.exists() else ctx.spec
        check_policy_fits(policy, own, ctx, ckpt)
        return LearnedPolicy(ctx, policy, name=learned_name or cfg.train.algorithm, own_spec=own)
    return make_heuristic(name, ctx)
