import numpy as np
import pytest
import torch
from pettingzoo.test import parallel_api_test, parallel_seed_test

from marl_sd.config import load_config
from marl_sd.envs import MECSpecDecEnv, MultiAgentVecEnv
from marl_sd.envs.core import ActionError

pytestmark = pytest.mark.sim


def masked_random(env, infos, rng):
    acts = {}
    for a in env.agents:
        mask, off, out = infos[a]["action_mask"], 0, []
        for n in env.sim.nvec:
            out.append(rng.choice(np.flatnonzero(mask[off : off + n])))
            off += n
        acts[a] = np.array(out)
    return acts


def test_parallel_api():
    env = MECSpecDecEnv(load_config(overrides=["env.check_actions=false", "env.horizon=25"]))
    parallel_api_test(env, num_cycles=30)


def test_parallel_seed():
    """PettingZoo's own determinism check: same seed, same observations, rewards and infos."""
    parallel_seed_test(lambda: MECSpecDecEnv(load_config(overrides=["env.check_actions=false", "env.horizon=25"])), num_cycles=30)


def test_own_metrics_are_per_user_when_users_equal_servers():
    env = MECSpecDecEnv(load_config(overrides=["scenario.n_users=3", "scenario.n_servers=3", "env.horizon=5"]))
    obs, infos = env.reset(seed=0)
    acts = {a: np.array([int(np.flatnonzero(infos[a]["action_mask"][:3])[0]), 0, 0, 2]) for a in env.agents}
    obs, rew, term, trunc, infos = env.step(acts)
    own = infos["user_0"]["own"]
    assert not any(k.startswith("server_") or k == "slot_ms_total" for k in own)
    assert "emitted" in own and "busy_ms" not in own


def rollout(seed, steps=200):
    env = MECSpecDecEnv(load_config(overrides=[f"env.horizon={steps}"]))
    obs, infos = env.reset(seed=seed)
    rng = np.random.default_rng(123)
    trace = []
    for _ in range(steps):
        acts = masked_random(env, infos, rng)
        obs, rew, term, trunc, infos = env.step(acts)
        trace.append(
            (
                np.stack([obs[a] for a in obs]),
                np.array([rew[a] for a in rew]),
                np.stack([infos[a]["action_mask"] for a in infos]),
                [sorted(infos[a]["own"].items()) for a in infos],
                env.state(),
            )
        )
    assert all(trunc.values()) and env.agents == []
    return trace


def test_multistep_determinism():
    a, b, c = rollout(7), rollout(7), rollout(8)
    assert len(a) == 200
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
        np.testing.assert_array_equal(x[2], y[2])
        assert x[3] == y[3]
        np.testing.assert_array_equal(x[4], y[4])
    assert any(not np.array_equal(x[0], z[0]) for x, z in zip(a, c))
    # the episode actually served requests
    assert sum(sum(dict(u)["emitted"] for u in x[3]) for x in a) > 200


def test_render_state_and_spaces():
    env = MECSpecDecEnv(load_config(overrides=["env.horizon=5"]), render_mode="rgb_array")
    obs, infos = env.reset(seed=0)
    img = env.render()
    assert img.shape == (480, 480, 3) and img.dtype == np.uint8 and img.std() > 0
    assert env.state().shape == env.state_space.shape
    for a in env.agents:
        assert env.observation_space(a).contains(obs[a])
        assert infos[a]["action_mask"].shape == (sum(env.sim.nvec),)


def test_bad_actions_raise_clearly():
    env = MECSpecDecEnv(load_config(overrides=["env.horizon=5"]))
    obs, infos = env.reset(seed=0)
    good = {a: np.zeros(4, dtype=int) for a in env.agents}
    for a in env.agents:  # a valid server for each agent
        good[a][0] = int(np.flatnonzero(infos[a]["action_mask"][: env.sim.M])[0])
    bad = {k: v.copy() for k, v in good.items()}
    bad["user_3"][3] = 99
    with pytest.raises(ActionError, match="user_3: gamma = 99 out of range"):
        env.step(bad)
    with pytest.raises(ValueError, match="missing actions"):
        env.step({"user_0": good["user_0"]})
    # gamma above the device limit violates the mask
    sim = env.sim
    sim.max_gamma[0, 2] = 3  # a device that drafts at most 3 tokens
    sim._update_mask()
    bad = {k: v.copy() for k, v in good.items()}
    bad["user_2"][3] = 4
    with pytest.raises(ActionError, match="user_2: gamma = 4 violates the action mask"):
        env.step(bad)
    # a server out of coverage violates the mask
    sim.mask[0, 0, : sim.M] = torch.tensor([True] + [False] * (sim.M - 1))
    bad = {k: v.copy() for k, v in good.items()}
    bad["user_0"][0] = 1
    with pytest.raises(ActionError, match="server out of coverage"):
        env.step(bad)


def test_vec_env_contract():
    cfg = load_config(overrides=["env.horizon=3"])
    v = MultiAgentVecEnv(cfg, num_envs=4)
    v.seed(5)
    o = v.reset()
    assert o.shape == (4 * 8, v.obs_dim + v.state_dim)
    m = v.action_masks()
    assert m.shape == (32, sum(v.nvec)) and m.dtype == bool
    for _ in range(3):
        a = np.stack([[np.flatnonzero(r[:3])[0], 0, 0, 0] for r in m])
        v.step_async(a)
        o2, r, d, infos = v.step_wait()
        m = v.action_masks()
    assert d.all() and infos[0]["TimeLimit.truncated"]
    assert infos[5]["terminal_observation"].shape == o.shape[1:]
    assert not np.array_equal(infos[5]["terminal_observation"], o2[5])
    v2 = MultiAgentVecEnv(cfg, num_envs=4, seed=99)
    v2.seed(5)
    np.testing.assert_array_equal(v2.reset(), o)
    m = v.pop_metrics()  # the 3 slots x 32 users were accounted, then the accumulator is emptied
    assert m["requests_completed"] <= m["arrived"] and "latency_per_token_ms" in m
    assert v.pop_metrics() == {}
