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
