"""TorchRL view of the batched simulator, for TorchRL and BenchMARL algorithms (`marl-sd[benchmarl]`).

`SimulatorEnv` is an `EnvBase` with batch size [B] and one agent group, "agents" (the N users):
  ("agents", "observation")  [B, N, obs_dim]  the local observation (the contract's feature table)
  ("agents", "action_mask")  [B, N, K]        True = allowed
  ("agents", "action")       [B, N, 4]        MultiCategorical over the sub-actions (action_mode "multi",
                                              K = sum(nvec), sb3-contrib's flat mask layout), or
                             [B, N]           one Categorical over the joint action (action_mode "flat",
                                              K = prod(nvec), the outer product of the sub-action masks:
                                              what BenchMARL's MASAC and QMIX need)
  ("agents", "reward")       [B, N, 1]
  "state"                    [B, state_dim]   the centralized critic's global state
  "done" / "terminated" / "truncated" [B, 1]  every environment is truncated at the horizon together
The simulator resets all environments at once at the horizon, as it does for SB3.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Categorical, Composite, MultiCategorical, Unbounded
from torchrl.envs import EnvBase

from marl_sd.config import Config
from marl_sd.contract import SUB_ACTIONS
from marl_sd.envs.core import BatchedSimulator

GROUP = "agents"


class SimulatorEnv(EnvBase):
    batch_locked = True

    def __init__(self, cfg: Config, num_envs: int | None = None, action_mode: str = "multi", seed: int | None = None):
        if action_mode not in ("multi", "flat"):
            raise ValueError(f"action_mode must be 'multi' or 'flat', got {action_mode!r}")
        torch.set_num_threads(cfg.sim.threads)
        self.sim = BatchedSimulator(cfg, num_envs=num_envs, seed=seed)
        B, N, dev = self.sim.B, self.sim.N, self.sim.device
        super().__init__(device=dev, batch_size=torch.Size([B]))
        self.cfg, self.action_mode = cfg, action_mode
        self._action_gen = torch.Generator(device=dev).manual_seed(cfg.seed if seed is None else int(seed))  # rand_action's own
        self.nvec = list(self.sim.nvec)
        self.group_map = {GROUP: [f"user_{i}" for i in range(N)]}
        if action_mode == "multi":
            n_mask = sum(self.nvec)
            act = MultiCategorical(nvec=self.nvec, shape=(B, N, len(SUB_ACTIONS)), dtype=torch.long, device=dev)
        else:
            n_mask = math.prod(self.nvec)
            act = Categorical(n=n_mask, shape=(B, N), dtype=torch.long, device=dev)
            self._joint = self.sim.actions.joint_actions(dev)  # [K, 4]: joint index -> action
        self.full_observation_spec = Composite(
            {
                GROUP: Composite(
                    observation=Unbounded((B, N, self.sim.obs_dim), device=dev),
                    action_mask=Binary(n=n_mask, shape=(B, N, n_mask), dtype=torch.bool, device=dev),
                    shape=(B, N),
                ),
                "state": Unbounded((B, self.sim.state_dim), device=dev),
            },
            shape=(B,),
            device=dev,
        )
        self.full_action_spec = Composite({GROUP: Composite(action=act, shape=(B, N))}, shape=(B,), device=dev)
        self.full_reward_spec = Composite(
            {GROUP: Composite(reward=Unbounded((B, N, 1), device=dev), shape=(B, N))}, shape=(B,), device=dev
        )
        flag = lambda: Categorical(2, (B, 1), dtype=torch.bool, device=dev)  # noqa: E731
        self.full_done_spec = Composite(done=flag(), terminated=flag(), truncated=flag(), shape=(B,), device=dev)

    def _mask(self) -> torch.Tensor:
        if self.action_mode == "multi":
            return self.sim.mask
        return self.sim.actions.joint_mask(self.sim.mask)

    def _observe(self) -> TensorDict:
        local, state = self.sim.obs_and_state()
        agents = TensorDict({"observation": local, "action_mask": self._mask()}, batch_size=(*self.batch_size, self.sim.N))
        return TensorDict({GROUP: agents, "state": state}, batch_size=self.batch_size, device=self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        self.sim.reset()
        out = self._observe()
        no = torch.zeros(*self.batch_size, 1, dtype=torch.bool, device=self.device)
        out.update({"done": no, "terminated": no.clone(), "truncated": no.clone()})
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        a = tensordict.get((GROUP, "action"))
        if self.action_mode == "flat":
            a = self._joint[a]
        reward, truncated = self.sim.step(a.long())
        out = self._observe()
        t = truncated.reshape(*self.batch_size, 1).clone()
        out.set((GROUP, "reward"), reward.unsqueeze(-1))
        out.update({"done": t, "terminated": torch.zeros_like(t), "truncated": t})
        return out

    def rand_action(self, tensordict: TensorDictBase | None = None) -> TensorDictBase:
        """A uniformly random *valid* action (the spec's own sampler ignores the mask, and the
        simulator refuses masked actions)."""
        if tensordict is None:
            tensordict = TensorDict({}, batch_size=self.batch_size, device=self.device)
        mask = tensordict.get((GROUP, "action_mask"), None)
        mask = self._mask() if mask is None else mask.bool()
        gen = self._action_gen
        if self.action_mode == "multi":
            a = self.sim.actions.random_valid(mask, gen)
        else:
            flat = mask.reshape(-1, mask.shape[-1]).float()
            a = torch.multinomial(flat, 1, generator=gen).reshape(mask.shape[:-1])
        tensordict.set((GROUP, "action"), a)
        return tensordict

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self.sim.seed(int(seed))
