"""PettingZoo `ParallelEnv` view of the batched simulator (B = 1)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import EzPickle
from pettingzoo import ParallelEnv

from marl_sd.config import Config, load_config
from marl_sd.envs.core import USER_METRICS, BatchedSimulator, summarize
from marl_sd.envs.render import render_frame


class MECSpecDecEnv(ParallelEnv, EzPickle):
    """Users of a multi-cell edge network choose server, bandwidth bid, verify priority and gamma.

    Actions per agent: MultiDiscrete([M, bid levels, priority levels, gamma_max + 1]).
    `infos[agent]["action_mask"]` holds the per-sub-action masks concatenated (flat, as
    sb3-contrib's MaskablePPO expects). Episodes end by truncation at `env.horizon` slots.
    Seeding goes through `reset(seed=...)` only.
    """

    metadata = {"render_modes": ["rgb_array"], "name": "mec_specdec_v0", "is_parallelizable": True}

    def __init__(self, config: Config | str | None = None, render_mode: str | None = None):
        EzPickle.__init__(self, config, render_mode)
        if config is None or isinstance(config, str):
            config = load_config(config)
        self.cfg = config
        torch.set_num_threads(config.sim.threads)
        self.sim = BatchedSimulator(config, num_envs=1)
        self.render_mode = render_mode
        self.possible_agents = [f"user_{i}" for i in range(self.sim.N)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(-np.inf, np.inf, (self.sim.obs_dim,), np.float32)
        self._act_space = spaces.MultiDiscrete(self.sim.nvec)
        self.state_space = spaces.Box(-np.inf, np.inf, (self.sim.state_dim,), np.float32)

    @functools.cache  # noqa: B019 - PettingZoo's idiom: one space object per agent
    def observation_space(self, agent):
        return self._obs_space

    @functools.cache  # noqa: B019
    def action_space(self, agent):
        return self._act_space

    def _obs(self):
        o = self.sim.observations()[0].cpu().numpy()
        return {a: o[i] for i, a in enumerate(self.agents)}

    def _infos(self, metrics=None):
        mask = self.sim.mask[0].cpu().numpy()
        infos = {a: {"action_mask": mask[i].copy()} for i, a in enumerate(self.agents)}
        if metrics is not None:
            # only what the slot defines: a ratio with nothing to divide (no request finished) is
            # omitted rather than NaN, so infos compare equal across identical runs
            env_m = {k: v for k, v in summarize(metrics).items() if v == v}
            for i, a in enumerate(self.agents):
                infos[a]["metrics"] = env_m
                infos[a]["own"] = {k: float(metrics[k][0, i]) for k in USER_METRICS}
        return infos

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.sim.seed(seed)
        self.sim.reset()
        self.agents = list(self.possible_agents)
        return self._obs(), self._infos()

    def step(self, actions):
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"missing actions for agents {missing}")
        unknown = [a for a in actions if a not in self.agents]
        if unknown:
            raise ValueError(f"actions given for unknown or finished agents {unknown}")
        a = np.stack([np.asarray(actions[ag], dtype=np.int64).reshape(-1) for ag in self.agents])
        if a.shape != (self.sim.N, 4):
            raise ValueError(f"each action must have 4 entries [server, bid, priority, gamma], got shape {a.shape[1:]}")
        rew, trunc = self.sim.step(torch.as_tensor(a).unsqueeze(0))
        metrics = self.sim.slot_metrics()
        obs = self._obs()
        infos = self._infos(metrics)
        r = rew[0].cpu().numpy()
        done = bool(trunc[0])
        rewards = {ag: float(r[i]) for i, ag in enumerate(self.agents)}
        terms = {ag: False for ag in self.agents}
        truncs = {ag: done for ag in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    def state(self):
        return self.sim.global_state()[0].cpu().numpy()

    def render(self):
        if self.render_mode != "rgb_array":
            return None

        return render_frame(self.sim, 0)

    def close(self):
        pass


def make_env(config: Config | str | None = None, **kw) -> MECSpecDecEnv:
    return MECSpecDecEnv(config, **kw)
