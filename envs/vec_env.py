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
from marl_sd.contract import ObsSpec
from marl_sd.envs.core import BatchedSimulator, summarize


class _InProcessVecEnv(VecEnv):
    """The VecEnv plumbing of an environment that lives in this process: attributes and
    methods are the object's own, for every slot."""

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


class MultiAgentVecEnv(_InProcessVecEnv):
    def __init__(
        self,
        cfg: Config,
        num_envs: int | None = None,
        device: str | None = None,
        seed: int | None = None,
        spec: ObsSpec | None = None,
    ):
        torch.set_num_threads(cfg.sim.threads)
        self.sim = BatchedSimulator(cfg, num_envs=num_envs, device=device, seed=seed, spec=spec)
        self.cfg = cfg
        self.render_mode = None
        self.obs_dim, self.state_dim = self.sim.obs_dim, self.sim.state_dim
        self.nvec = list(self.sim.nvec)
        self._actions = None
        self._next_seed: int | None = None
        self._episode_metrics: dict[str, torch.Tensor] = {}
        self.parts = [self]
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

    # ---- metrics and exact state
    def _accumulate(self, m: dict[str, torch.Tensor]) -> None:
        for k, v in m.items():
            s = v.sum(0)
            self._episode_metrics[k] = self._episode_metrics.get(k, 0) + s

    def pop_raw_metrics(self) -> dict[str, torch.Tensor]:
        """The slot accumulators since the last call (summed over environments), reset."""
        out, self._episode_metrics = self._episode_metrics, {}
        return out

    def pop_metrics(self) -> dict[str, float]:
        """Headline metrics since the last call (aggregated in torch, pulled once)."""
        raw = self.pop_raw_metrics()
        return summarize(raw) if raw else {}

    def get_state(self) -> dict:
        return self.sim.get_state()

    def set_state(self, state: dict) -> None:
        self.sim.set_state(state)
        self._next_seed = None


SEED_STRIDE = 7919  # part k of a MixedVecEnv draws from seed + k * SEED_STRIDE


class MixedVecEnv(_InProcessVecEnv):
    """Several `MultiAgentVecEnv`s (other sizes, or other physics) behind one VecEnv, so one
    policy trains on all of them in every rollout: slots of part k follow those of part k-1.
    Every part encodes its observations with the same contract (`cfg`'s constants and
    `env.max_servers` room), and gets about `agents * weight` agent slots, so no part dominates
    the gradient by its size."""

    def __init__(
        self,
        cfg: Config,
        parts: list[Config],
        labels: list[str],
        agents: list[float],
        seed: int | None = None,
    ):
        base = cfg.seed if seed is None else seed
        spec = ObsSpec.from_config(cfg)
        self.parts = [
            MultiAgentVecEnv(c, num_envs=max(1, round(a / c.scenario.n_users)), seed=base + SEED_STRIDE * k, spec=spec)
            for k, (c, a) in enumerate(zip(parts, agents))
        ]
        first = self.parts[0]
        self.cfg, self.labels = cfg, list(labels)
        self.obs_dim, self.state_dim, self.nvec = first.obs_dim, first.state_dim, first.nvec
        self.render_mode = None
        self.bounds = np.cumsum([0] + [p.num_envs for p in self.parts])
        super().__init__(int(self.bounds[-1]), first.observation_space, first.action_space)

    def reset(self):
        return np.concatenate([p.reset() for p in self.parts])

    def step_async(self, actions):
        a = np.asarray(actions)
        for p, lo, hi in zip(self.parts, self.bounds[:-1], self.bounds[1:]):
            p.step_async(a[lo:hi])

    def step_wait(self):
        out = [p.step_wait() for p in self.parts]
        return (
            np.concatenate([o[0] for o in out]),
            np.concatenate([o[1] for o in out]),
            np.concatenate([o[2] for o in out]),
            [i for o in out for i in o[3]],
        )

    def action_masks(self) -> np.ndarray:
        return np.concatenate([p.action_masks() for p in self.parts])

    def seed(self, seed=None):
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        for k, p in enumerate(self.parts):
            p.seed(int(seed) + SEED_STRIDE * k)
        return [int(seed)] * self.num_envs

    def pop_metrics(self) -> dict[str, float]:
        """Headline metrics since the last call, pooled over the parts, and per part
        (`<label>/<metric>`) for the latency."""
        total: dict[str, torch.Tensor] = {}
        out: dict[str, float] = {}
        for label, p in zip(self.labels, self.parts):
            raw = p.pop_raw_metrics()
            if raw:
                out[f"{label}/latency_per_token_ms"] = summarize(raw)["latency_per_token_ms"]
            for k, v in raw.items():
                total[k] = total.get(k, 0) + v.sum()
        return {**summarize(total), **out} if total else {}

    def get_state(self) -> dict:
        return {"parts": [p.get_state() for p in self.parts], "labels": self.labels}

    def set_state(self, state: dict) -> None:
        if list(state.get("labels", [])) != self.labels:
            raise ValueError(f"saved state is for parts {state.get('labels')}, this env trains on {self.labels}")
        for p, s in zip(self.parts, state["parts"]):
            p.set_state(s)


class MixedSizeVecEnv(MixedVecEnv):
    """One scenario at several sizes (users, servers), about `agents_per_size` agent slots each."""

    def __init__(self, cfg: Config, sizes: list[tuple[int, int]], agents_per_size: int, seed: int | None = None):
        self.sizes = [tuple(s) for s in sizes]
        super().__init__(
            cfg,
            [cfg.at_size(n, m) for n, m in self.sizes],
            [f"{n}x{m}" for n, m in self.sizes],
            [agents_per_size] * len(sizes),
            seed,
        )


def physics_env(cfg: Config, agents: int, seed: int | None = None) -> MixedVecEnv:
    """One part per `train.physics` entry, `agents * weight / mean weight` agent slots each."""
    ph = cfg.train.physics
    mean_w = sum(p.weight for p in ph) / len(ph)
    return MixedVecEnv(
        cfg, [cfg.with_physics(k) for k in range(len(ph))], [p.name for p in ph], [agents * p.weight / mean_w for p in ph], seed
    )


def training_env(cfg: Config, num_envs: int | None = None) -> MultiAgentVecEnv | MixedVecEnv:
    """The VecEnv a run trains on: the scenario's size, every size of `train.sizes`, or every
    physics of `train.physics` (about `num_envs` x `n_users` agent slots each)."""
    B = num_envs or cfg.train.num_envs
    if cfg.train.physics:
        return physics_env(cfg, B * cfg.scenario.n_users)
    if not cfg.train.sizes:
        return MultiAgentVecEnv(cfg, num_envs=B)
    return MixedSizeVecEnv(cfg, cfg.train.sizes, B * cfg.scenario.n_users)
