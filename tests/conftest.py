import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture
def small_cfg():
    from marl_sd.config import load_config

    return load_config(overrides=["env.horizon=20"])


def stepped_sim(steps: int, seed: int, num_envs: int = 3, record_requests: bool = False):
    """A default-scenario simulator advanced `steps` slots with random valid actions."""
    from marl_sd.config import load_config
    from marl_sd.envs.core import BatchedSimulator

    s = BatchedSimulator(load_config(), num_envs=num_envs, seed=seed)
    s.record_requests = record_requests
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        s.step(s.actions.random_valid(s.mask, gen))
    return s


def physics_config(tmp_path, extra=()):
    """A smoke config trained across two tiny physics (fast and slow sites), written under `tmp_path`."""
    import yaml

    from marl_sd.config import CONFIG_DIR, load_config

    (tmp_path / "fast.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "fast_sites",
                "scenario": {
                    "n_users": 3,
                    "n_servers": 2,
                    "profile": "llama31_8b_h100",
                    "workload": {"arrival_rate_per_s": 1.0, "output_tokens": {"low": 16, "high": 64}},
                },
            }
        )
    )
    (tmp_path / "slow.yaml").write_text(
        yaml.safe_dump(
            {"name": "slow_sites", "scenario": {"n_users": 5, "n_servers": 3, "workload": {"arrival_rate_per_s": 1.0}}}
        )
    )
    base = {
        "extends": str(CONFIG_DIR / "smoke.yaml"),
        "env": {"max_servers": 4, "horizon": 8},
        "train": {
            "physics": ["fast.yaml", {"from": "slow.yaml", "weight": 2.0}],
            "num_envs": 2,
            "n_steps": 8,
            "eval_episodes": 2,
            "checkpoint_every": 1,
            "eval_every": 2,
            "pretrain": {"teacher": "auto", "candidates": ["nearest_g4", "greedy_latency"], "iterations": 2},
        },
    }
    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(base))
    return load_config(p, list(extra))


# a rollout search small enough for tests (and guarded by nothing, so it departs)
QUICK_SEARCH = ["eval.oracle.samples=4", "eval.oracle.moves=6", "eval.oracle.horizon=3", "eval.oracle.min_z=0"]

TIERS = ("unit", "sim", "train", "net", "ray")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier (README: Tests), so `make test` and `make test-all`
    select by tier and no test is silently left out of both."""
    bad = [f"{it.nodeid}: {tiers or 'none'}" for it in items if len(tiers := [t for t in TIERS if it.get_closest_marker(t)]) != 1]
    if bad:
        raise pytest.UsageError("tests need exactly one tier marker of " + ", ".join(TIERS) + ":\n  " + "\n  ".join(bad))


# a training run of a few seconds: 3 users, 2 servers, 16-slot episodes, 4 environments
TINY_TRAIN = [
    "scenario.n_users=3",
    "scenario.n_servers=2",
    "env.horizon=16",
    "train.num_envs=4",
    "train.n_steps=8",
    "train.num_mini_batch=2",
    "train.n_epochs=2",
    "train.checkpoint_every=2",
    "train.eval_every=100",
    "train.eval_episodes=2",
    "train.hidden=[32, 32]",
]
