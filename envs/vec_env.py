"""stable-baselines3 `VecEnv` over the batched simulator: B x N agent slots, no SuperSuit.

Slot i is environment i // N, agent i % N (parameter sharing). Each observation is
`[local obs | global state]` so a MAPPO policy can slice actor and critic inputs. Masks are
served by `action_masks()` in sb3-contrib's flat MultiDiscrete layout; at the horizon every
slot is done with `terminal_observation` and `TimeLimit.truncated` for value bootstrapping.
"""
from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from marl_sd.config import Config
from marl_sd.envs.core import BatchedSimulator, summarize


class MultiAgentVecEnv(VecEnv):
    def __init__(self, cfg: Config, num_envs: int | None = None, device: str | None = None, seed: int | None = None):
        torch.set_num_threads(cfg.sim.threads)
        self.sim = BatchedSimulator(cfg, num_envs=num_envs, device=device, seed=seed)
        self.cfg = cfg
        self.render_mode = None
        self.obs_dim, self.state_dim = self.sim.obs_dim, self.sim.state_dim
        self.nvec = list(self.sim.nvec)
        self._actions = None
        self._next_seed: int | None = None
        self._episode_metrics: dict[str, torch.Tensor] = {}
        n = self.sim.B * self.sim.N
        obs_space = spaces.Box(-np.inf, np.inf, (self.obs_dim + self.state_dim,), np.float32)
        super().__init__(n, obs_space, spaces.MultiDiscrete(self.nvec))

    # ---- VecEnv API
    def _obs(self) -> np.ndarray:
        local, state = self.sim.obs_and_state()
        B, N = self.sim.B, self.sim.N
        full = torch.cat([local, state.unsqueeze(1).expand(B, N, -1)], -1)
        return full.reshape(B * N, -1).cpu().numpy()  # fresh array every call

    def reset(self):
        if self._next_seed is not None:
            self.sim.seed(self._next_seed)
            self._next_seed = None
        self.sim.reset()
        return self._obs()

    def step_async(self, actions):
        self._actions = actions

    def step_wait(self):
        s = self.sim
        a = torch.as_tensor(np.asarray(self._actions), device=s.device).long().view(s.B, s.N, -1)
        reward, truncated = s.step(a)
        self._accumulate(s.slot_metrics())
        obs = self._obs()
        infos = [{} for _ in range(self.num_envs)]
        dones = np.zeros(self.num_envs, dtype=bool)
        if bool(truncated.any()):
            terminal = obs
            s.reset()
            obs = self._obs()
            for i in range(self.num_envs):
                infos[i]["terminal_observation"] = terminal[i]
                infos[i]["TimeLimit.truncated"] = True
            dones[:] = True
        return obs, reward.reshape(-1).cpu().numpy().astype(np.float32), dones, infos

    def action_masks(self) -> np.ndarray:
        return self.sim.mask.reshape(self.num_envs, -1).cpu().numpy()

    def seed(self, seed=None):
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        self._next_seed = int(seed)
        return [int(seed)] * self.num_envs

    def close(self):
        pass

    def get_attr(self, name, indices=None):
        return [getattr(self, name) for _ in self._get_indices(indices)]

    def set_attr(self, name, value, indices=None):
        setattr(self, name, value)

    def has_attr(self, name):
        return hasattr(self, name)

    def env_method(self, name, *args, indices=None, **kwargs):
        out = getattr(self, name)(*args, **kwargs)
        return out if indices is None else [out[i] for i in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._get_indices(indices)]

    # ---- metrics and exact state
    def _accumulate(self, m: dict[str, torch.Tensor]) -> None:
        for k, v in m.items():
            s = v.sum(0)
            self._episode_metrics[k] = self._episode_metrics.get(k, 0) + s

    def pop_metrics(self) -> dict[str, float]:
        """Headline metrics since the last call (aggregated in torch, pulled once)."""
        if not self._episode_metrics:
            return {}
        out = summarize(self._episode_metrics)
        self._episode_metrics = {}
        return out

    def get_state(self) -> dict:
        return self.sim.get_state()

    def set_state(self, state: dict) -> None:
        self.sim.set_state(state)
        self._next_seed = None
