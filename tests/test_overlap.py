"""`train.overlap`: the collector process, its one-update lag, and exact resume through it."""

import pytest
import torch
from conftest import TINY_TRAIN

from marl_sd.agents.overlap import OverlappedVecEnv
from marl_sd.agents.train import list_checkpoints, train
from marl_sd.config import load_config

pytestmark = pytest.mark.train
PER_ROLLOUT = 8 * 4 * 3
OVERLAP = [*TINY_TRAIN, "train.overlap=true"]


def params(model):
    return torch.cat([p.detach().flatten() for p in model.policy.parameters()])


def test_overlapped_training_resumes_exactly_and_differs_from_the_serial_run(tmp_path):
    cfg = load_config(overrides=OVERLAP)
    full = train(cfg, tmp_path / "full", progress=False, total_timesteps=4 * PER_ROLLOUT)
    part = train(cfg, tmp_path / "part", progress=False, total_timesteps=2 * PER_ROLLOUT)
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == [f"ckpt_{2 * PER_ROLLOUT}"]
    assert not torch.equal(params(part), params(full))
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, total_timesteps=4 * PER_ROLLOUT)
    assert resumed.num_timesteps == full.num_timesteps == 4 * PER_ROLLOUT
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=0)
    assert full.ep_info_buffer, "episode statistics come back from the collector"
    serial = train(load_config(overrides=TINY_TRAIN), tmp_path / "serial", progress=False, total_timesteps=4 * PER_ROLLOUT)
    assert not torch.equal(params(serial), params(full))


def test_each_rollout_is_collected_one_update_behind(tmp_path, monkeypatch):
    """The weights handed to the collector for rollout k+2 are the ones rollout k+1 trains from."""
    handed, trained_from = [], []
    collect = OverlappedVecEnv.collect

    def spy_collect(self, policy):
        handed.append(params_of(policy))
        collect(self, policy)

    def params_of(policy):
        return torch.cat([p.detach().flatten().clone() for p in policy.parameters()])

    from marl_sd.agents.mappo import MAPPO

    orig_train = MAPPO.train

    def spy_train(self):
        trained_from.append(params_of(self.policy))
        orig_train(self)

    monkeypatch.setattr(OverlappedVecEnv, "collect", spy_collect)
    monkeypatch.setattr(MAPPO, "train", spy_train)
    train(load_config(overrides=OVERLAP), tmp_path / "run", progress=False, total_timesteps=3 * PER_ROLLOUT)
    # fresh start: rollout 1 and rollout 2 are both collected with the initial weights
    assert len(handed) == 4 and len(trained_from) == 3
    assert torch.equal(handed[0], handed[1]) and torch.equal(handed[0], trained_from[0])
    for k in range(1, 3):  # collection k+2 starts with the weights update k starts from
        assert torch.equal(handed[k + 1], trained_from[k])
        assert not torch.equal(trained_from[k], trained_from[k - 1])


def test_a_dead_collector_is_a_clear_error(tmp_path, monkeypatch):
    collect = OverlappedVecEnv.collect

    def collect_then_die(self, policy):
        collect(self, policy)
        self.proc.kill()

    monkeypatch.setattr(OverlappedVecEnv, "collect", collect_then_die)
    with pytest.raises(RuntimeError, match="collector process died"):
        train(load_config(overrides=OVERLAP), tmp_path / "run", progress=False, total_timesteps=2 * PER_ROLLOUT)


def test_overlap_needs_the_sb3_backend():
    with pytest.raises(ValueError, match="train.overlap"):
        load_config("configs/benchmarl.yaml", ["train.overlap=true"])
