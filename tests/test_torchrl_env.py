"""The TorchRL view of the simulator: TorchRL's own spec check in both action modes, rollouts
across the horizon (auto-reset), and the same trajectory as the simulator driven directly."""

import pytest
import torch

from marl_sd.config import load_config
from marl_sd.envs.core import BatchedSimulator

pytestmark = pytest.mark.sim

torchrl = pytest.importorskip("torchrl")
from torchrl.envs.utils import check_env_specs  # noqa: E402

from marl_sd.envs.torchrl_env import SimulatorEnv  # noqa: E402

CFG = ["env.horizon=6", "scenario.n_users=4", "scenario.workload.arrival_rate_per_s=1.0"]


@pytest.mark.parametrize("mode", ["multi", "flat"])
def test_specs_hold_and_rollouts_cross_the_horizon(mode):
    env = SimulatorEnv(load_config(overrides=CFG), num_envs=3, action_mode=mode, seed=1)
    check_env_specs(env)
    td = env.rollout(14, break_when_any_done=False)
    assert td.batch_size == torch.Size([3, 14])
    assert int(td["next", "done"].sum()) == 2 * 3  # the horizon (6) is crossed twice in 14 steps
    k = sum(env.nvec) if mode == "multi" else torch.tensor(env.nvec).prod().item()
    assert td["agents", "action_mask"].shape == (3, 14, 4, k)
    assert td["agents", "observation"].shape[-1] == env.sim.obs_dim and td["state"].shape[-1] == env.sim.state_dim


def test_the_joint_action_decodes_to_the_same_step_as_the_simulator():
    cfg = load_config(overrides=CFG)
    env = SimulatorEnv(cfg, num_envs=2, action_mode="flat", seed=3)
    ref = BatchedSimulator(cfg, num_envs=2, seed=3)
    td = env.reset()
    ref.reset()
    for _ in range(5):
        td = env.rand_action(td)
        a = env._joint[td["agents", "action"]]
        assert bool(ref.actions.allowed(a, ref.mask).all())  # the joint mask allows only what the simulator allows
        r_ref, _ = ref.step(a)
        td = env.step(td)
        assert torch.equal(td["next", "agents", "reward"][..., 0], r_ref)
        td = td["next"]
    assert torch.equal(td["agents", "observation"], ref.observations())
