"""MAPPO on stable-baselines3: sb3-contrib MaskablePPO + a centralized-critic policy.

* `MAPPOPolicy`: the observation is `[local obs | global state]`; the actor reads the local
  slice only (decentralized execution), the critic reads local + state (centralized training)
  or only the local slice (`critic_input="local"`: independent PPO, the ablation). LayerNorm on
  inputs and hidden layers, SB3's orthogonal init (gains sqrt(2) / 0.01 / 1).
* `SetActor` (`train.actor: set`, the default): one network scores every candidate server from
  [the user's scalars, that server's features] and a mean over the valid servers' embeddings;
  the bid, priority and gamma heads read the user's embedding and that mean. Swapping two
  servers swaps their logits and nothing else, padded servers are ignored, and no input
  depends on the number of users, so one actor runs at any size up to `max_servers`.
* `ValueNorm`: the critic head predicts normalized values; this output layer de-normalizes them
  with a debiased running mean/variance of the returns, and `MAPPO.train` scales `vf_coef` by
  1/variance, which is exactly MAPPO's normalized value loss.
* `MAPPO.collect_rollouts`: sb3-contrib 2.9.2's loop with the truncation bootstrap done in one
  batched critic forward instead of one forward per truncated slot.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableRolloutBuffer
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn

from marl_sd.agents.overlap import OverlappedVecEnv
from marl_sd.config import TrainConfig
from marl_sd.contract import ActionLayout, ObsSpec


def _mlp(in_dim: int, arch: list[int], activation, layer_norm: bool) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if layer_norm else []
    for h in arch:
        layers += [nn.Linear(in_dim, h), activation()]
        if layer_norm:
            layers.append(nn.LayerNorm(h))
        in_dim = h
    return nn.Sequential(*layers), in_dim


class SetActor(nn.Module):
    """Logits [batch, sum(nvec)] from flat local observations, permutation-equivariant over
    servers (see the module docstring). `user_idx`/`cand_idx` locate the per-user scalars and
    the [max_servers, features] candidate block in the flat observation (`ObsSpec.blocks`);
    `valid_col` is the server_valid feature's position among the candidate features.

    Per candidate: one embedding layer, then the score layer; linear layers on concatenations
    are split into their parts, so the user's part (and the pooled context's) is computed once
    per user instead of once per candidate server. Candidate inputs are not layer-normalized
    (the feature table already scales them). The per-candidate work is what the actor costs
    beyond an MLP (benchmarks/train_throughput.py)."""

    def __init__(
        self,
        user_idx: list[int],
        cand_idx: list[list[int]],
        valid_col: int,
        nvec: list[int],
        arch: list[int],
        activation,
        layer_norm: bool,
    ):
        super().__init__()
        M, C = len(cand_idx), len(cand_idx[0])
        self.register_buffer("user_idx", torch.as_tensor(user_idx, dtype=torch.long), persistent=False)
        # feature-major flat index: index_select then view [C, M] is cheaper than a 2-D gather
        self.register_buffer("cand_flat", torch.as_tensor(cand_idx, dtype=torch.long).T.reshape(-1), persistent=False)
        self.M, self.C, self.valid_col = M, C, valid_col
        U, H = len(user_idx), arch[-1]
        self.user_net, _ = _mlp(U, arch, activation, layer_norm)
        self.cand_user = nn.Linear(U, arch[0])
        self.cand_own = nn.Linear(C, arch[0], bias=False)
        self.cand_rest = nn.Sequential(activation(), *([nn.LayerNorm(arch[0])] if layer_norm else []))
        self.score_own, self.score_ctx = nn.Linear(arch[0], H), nn.Linear(arch[0], H, bias=False)
        self.score_out = nn.Sequential(activation(), nn.Linear(H, 1))
        layout = ActionLayout(nvec)
        self.others = {n: k for n, k in layout.sizes().items() if n != "server"}  # the heads, in contract order
        self.heads = nn.Sequential(nn.Linear(H + arch[0], H), activation(), nn.Linear(H, sum(self.others.values())))
        self.layout = layout

    def output_layers(self) -> list[nn.Linear]:
        return [self.score_out[-1], self.heads[-1]]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        u = obs.index_select(-1, self.user_idx)  # [B, U]
        c = obs.index_select(-1, self.cand_flat).unflatten(-1, (self.C, self.M)).transpose(-1, -2)  # [B, M, C]
        valid = c[..., self.valid_col] > 0.5  # [B, M]
        e = self.cand_rest(self.cand_own(c) + self.cand_user(u).unsqueeze(-2))  # [B, M, H]
        w = valid.to(e.dtype).unsqueeze(-1)
        g = (e * w).sum(-2) / w.sum(-2).clamp(min=1.0)  # [B, H] mean over valid servers
        s = self.score_out(self.score_own(e) + self.score_ctx(g).unsqueeze(-2)).squeeze(-1)
        s = torch.where(valid, s, torch.full_like(s, -1e4))
        heads = self.heads(torch.cat([self.user_net(u), g], -1)).split(list(self.others.values()), -1)
        return self.layout.join({"server": s, **dict(zip(self.others, heads, strict=True))})


class SplitMlpExtractor(nn.Module):
    """Drop-in for SB3's MlpExtractor: actor on the local slice, critic on local+state or local.
    With a `set_actor` the actor's output is already the logits (the policy's action_net is
    then the identity)."""

    def __init__(
        self,
        obs_dim,
        state_dim,
        pi_arch,
        vf_arch,
        activation,
        layer_norm,
        critic_input,
        set_actor: SetActor | None = None,
        n_logits: int = 0,
    ):
        super().__init__()
        self.obs_dim, self.critic_input = obs_dim, critic_input
        if set_actor is not None:
            self.policy_net, self.latent_dim_pi = set_actor, n_logits
        else:
            self.policy_net, self.latent_dim_pi = _mlp(obs_dim, pi_arch, activation, layer_norm)
        vf_in = {"local+state": obs_dim + state_dim, "state": state_dim, "local": obs_dim}[critic_input]
        self.value_net, self.latent_dim_vf = _mlp(vf_in, vf_arch, activation, layer_norm)

    def forward(self, features):
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features):
        return self.policy_net(features[..., : self.obs_dim])

    def forward_critic(self, features):
        if self.critic_input == "local+state":
            x = features
        elif self.critic_input == "state":
            x = features[..., self.obs_dim :]
        else:
            x = features[..., : self.obs_dim]
        return self.value_net(x)


class MaxMarginal(nn.Module):
    """Joint-action scores [..., prod(nvec)] (in `ActionLayout.joint_actions` order)
    -> per sub-action max-marginals [..., sum(nvec)]: each choice's best joint score. Its masked
    argmax per sub-action is the masked joint argmax whenever the best joint action is allowed."""

    def __init__(self, nvec: list[int]):
        super().__init__()
        self.nvec = [int(n) for n in nvec]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = x.unflatten(-1, self.nvec)
        K, out = len(self.nvec), []
        for k in range(K):
            other = [K - i for i in range(K) if i != k]  # dims counted from the end
            out.append(j.amax(dim=[-d for d in other]))
        return torch.cat(out, -1)


class ValueNorm(nn.Module):
    """Debiased EMA of the return mean / mean-square (float64 buffers), as an output layer."""

    def __init__(self, beta: float = 0.999, eps: float = 1e-5):
        super().__init__()
        self.beta, self.eps = beta, eps
        for n in ("mean", "mean_sq", "debias"):
            self.register_buffer(n, torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.mean.device, torch.float64).flatten()
        self.mean.mul_(self.beta).add_((1 - self.beta) * x.mean())
        self.mean_sq.mul_(self.beta).add_((1 - self.beta) * (x**2).mean())
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def _mu_var(self):
        d = self.debias.clamp(min=self.eps)
        mu = self.mean / d
        var = (self.mean_sq / d - mu**2).clamp(min=1e-2)
        fresh = self.debias == 0
        return torch.where(fresh, 0.0, mu), torch.where(fresh, 1.0, var)

    def stats(self) -> tuple[float, float]:
        mu, var = self._mu_var()
        return float(mu), float(var)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        mu, var = self._mu_var()
        return v * var.sqrt().to(v.dtype) + mu.to(v.dtype)


class MAPPOPolicy(MaskableActorCriticPolicy):
    """`actor="set"` takes `set_layout = (user_idx, cand_idx, valid_col)` from `ObsSpec.blocks`."""

    def __init__(
        self,
        *args,
        obs_dim: int,
        state_dim: int,
        critic_input: str = "local+state",
        layer_norm: bool = True,
        value_norm: bool = True,
        value_norm_beta: float = 0.999,
        actor: str = "mlp",
        set_layout: tuple | None = None,
        joint_head: bool = False,
        **kwargs,
    ):
        """`joint_head`: the MLP actor's output layer scores every joint action and the policy's
        logits are its max-marginals per sub-action (`MaxMarginal`: actors trained on the joint
        action, e.g. BenchMARL's MASAC and QMIX)."""
        self.obs_dim, self.state_dim, self.critic_input = obs_dim, state_dim, critic_input
        self.layer_norm, self.value_norm, self.value_norm_beta = layer_norm, value_norm, value_norm_beta
        if actor == "set" and set_layout is None:
            raise ValueError("actor='set' needs set_layout (ObsSpec.blocks and the server_valid column)")
        self.actor, self.set_layout, self.joint_head = actor, set_layout, joint_head
        if joint_head and actor != "mlp":
            raise ValueError("joint_head needs actor='mlp'")
        kwargs.setdefault("activation_fn", nn.ReLU)
        kwargs.setdefault("net_arch", dict(pi=[64, 64], vf=[64, 64]))
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        a = self.net_arch if isinstance(self.net_arch, dict) else dict(pi=self.net_arch, vf=self.net_arch)
        set_actor, n_logits = None, int(sum(self.action_space.nvec))
        if self.actor == "set":
            user_idx, cand_idx, valid_col = self.set_layout
            set_actor = SetActor(
                user_idx, cand_idx, valid_col, list(self.action_space.nvec), a["pi"], self.activation_fn, self.layer_norm
            )
        self.mlp_extractor = SplitMlpExtractor(
            self.obs_dim,
            self.state_dim,
            a["pi"],
            a["vf"],
            self.activation_fn,
            self.layer_norm,
            self.critic_input,
            set_actor,
            n_logits,
        )

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        if self.actor == "set":  # the set actor's own output layers are the action net
            self.action_net = nn.Identity()
            if self.ortho_init:
                for layer in self.mlp_extractor.policy_net.output_layers():
                    self.init_weights(layer, gain=0.01)
        if self.joint_head:
            nvec = [int(n) for n in self.action_space.nvec]
            self.action_net = nn.Sequential(nn.Linear(self.mlp_extractor.latent_dim_pi, math.prod(nvec)), MaxMarginal(nvec))
        if self.value_norm:
            self.value_net = nn.Sequential(self.value_net, ValueNorm(self.value_norm_beta))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def actor_parameters(self) -> list[nn.Parameter]:
        return list(self.mlp_extractor.policy_net.parameters()) + list(self.action_net.parameters())

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.mlp_extractor.value_net.parameters()) + list(self.value_net.parameters())

    @property
    def value_normalizer(self) -> ValueNorm | None:
        return self.value_net[1] if self.value_norm else None

    def joint_scores(self, local_obs: torch.Tensor) -> torch.Tensor:
        """A joint head's scores over every joint action [batch, prod(nvec)] (`joint_head` only)."""
        return self.action_net[0](self.mlp_extractor.policy_net(local_obs))

    def actor_logits(self, local_obs: torch.Tensor) -> torch.Tensor:
        """Raw concatenated logits [batch, sum(nvec)] from local observations (what export ships)."""
        return self.action_net(self.mlp_extractor.policy_net(local_obs))

    @property
    def max_servers(self) -> int:
        return ActionLayout(self.action_space.nvec).size("server")

    def _get_constructor_parameters(self):
        d = super()._get_constructor_parameters()
        d.update(
            obs_dim=self.obs_dim,
            state_dim=self.state_dim,
            critic_input=self.critic_input,
            layer_norm=self.layer_norm,
            value_norm=self.value_norm,
            value_norm_beta=self.value_norm_beta,
            actor=self.actor,
            set_layout=self.set_layout,
            joint_head=self.joint_head,
        )
        return d


class MAPPO(MaskablePPO):
    """MaskablePPO + value normalization + batched truncation bootstrap."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vf_coef_base = self.vf_coef

    def train(self) -> None:
        vn = getattr(self.policy, "value_normalizer", None)
        if vn is not None:
            vn.update(torch.as_tensor(self.rollout_buffer.returns))
            _, var = vn.stats()
            self.vf_coef = self.vf_coef_base / var
            self.logger.record("train/value_norm_std", var**0.5)
        super().train()

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps, use_masking=True):
        if isinstance(env, OverlappedVecEnv):
            return self._collect_overlapped(env, callback, rollout_buffer)
        assert isinstance(rollout_buffer, (MaskableRolloutBuffer, MaskableDictRolloutBuffer))
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        n_steps = 0
        action_masks = None
        rollout_buffer.reset()
        if use_masking and not is_masking_supported(env):
            raise ValueError("Environment does not support action masking.")
        callback.on_rollout_start()
        while n_steps < n_rollout_steps:
            with torch.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)
                if use_masking:
                    action_masks = get_action_masks(env)
                actions, values, log_probs = self.policy(obs_tensor, action_masks=action_masks)
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            idx = [
                i
                for i in np.flatnonzero(dones)
                if infos[i].get("terminal_observation") is not None and infos[i].get("TimeLimit.truncated", False)
            ]
            if idx:
                term_obs = np.stack([infos[i]["terminal_observation"] for i in idx])
                with torch.no_grad():
                    tv = self.policy.predict_values(obs_as_tensor(term_obs, self.device))
                rewards[idx] += self.gamma * tv.flatten().cpu().numpy()
            rollout_buffer.add(
                self._last_obs, actions, rewards, self._last_episode_starts, values, log_probs, action_masks=action_masks
            )
            self._last_obs = new_obs
            self._last_episode_starts = dones
        with torch.no_grad():
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.on_rollout_end()
        return True

    def _values(self, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.policy.predict_values(obs_as_tensor(obs, self.device)).flatten().cpu().numpy()

    def _collect_overlapped(self, env: OverlappedVecEnv, callback, rollout_buffer) -> bool:
        """The rollout the collector process delivered (see `agents/overlap.py`); the collector
        starts on the next one with the current weights before this one is trained on."""
        self.policy.set_training_mode(False)
        if not env.running:
            env.start(self.policy, self._last_obs, self._last_episode_starts)
            if env.pending is None:
                env.collect(self.policy)
        r = env.wait()
        callback.on_rollout_start()  # a checkpoint here holds `r` as the pending rollout
        env.collect(self.policy)
        T, n = r.rewards.shape
        values = self._values(r.obs.reshape(T * n, -1)).reshape(T, n)
        rewards = r.rewards.copy()
        for t, idx, term in r.truncations:
            rewards[t, idx] += self.gamma * self._values(term)
        rb = rollout_buffer
        rb.reset()
        rb.observations[:] = r.obs.reshape(rb.observations.shape)
        rb.actions[:] = r.actions.reshape(rb.actions.shape)
        rb.rewards[:], rb.episode_starts[:], rb.values[:], rb.log_probs[:] = rewards, r.starts, values, r.log_probs
        rb.action_masks[:] = r.masks.reshape(rb.action_masks.shape)
        rb.pos, rb.full = rb.buffer_size, True
        env.last_metrics = r.metrics
        self._update_info_buffer([{"episode": e} for e in r.episodes])
        for _ in range(T):
            self.num_timesteps += n
            if not callback.on_step():
                return False
        self._last_obs, self._last_episode_starts = r.last_obs, r.dones[-1]
        rb.compute_returns_and_advantage(last_values=torch.as_tensor(self._values(r.last_obs)), dones=r.dones[-1])
        callback.on_rollout_end()
        return True


class LinearSchedule:
    """Learning rate decaying linearly to 0 over the run (SB3 passes the remaining progress 1 -> 0)."""

    def __init__(self, initial: float):
        self.initial = initial

    def __call__(self, progress_remaining: float) -> float:
        return self.initial * progress_remaining


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
    return device


def set_layout(spec: ObsSpec) -> tuple[list[int], list[list[int]], int]:
    """Where a set actor finds its inputs in the flat observation."""
    user_idx, cand_idx = spec.blocks()
    per_server = [f.name for f in spec.features if f.width == "M"]
    return user_idx, cand_idx, per_server.index("server_valid")


def mappo_kwargs(t: TrainConfig, obs_dim: int, state_dim: int, num_envs: int, spec: ObsSpec) -> dict:
    """MAPPO-paper hyper-parameters mapped onto MaskablePPO arguments."""
    rollout = t.n_steps * num_envs
    if rollout % t.num_mini_batch:
        raise ValueError(f"train.n_steps * num_envs ({rollout}) must be divisible by train.num_mini_batch ({t.num_mini_batch})")
    return dict(
        n_steps=t.n_steps,
        batch_size=rollout // t.num_mini_batch,
        n_epochs=t.n_epochs,
        learning_rate=t.learning_rate if t.lr_schedule == "constant" else LinearSchedule(t.learning_rate),
        gamma=t.gamma,
        gae_lambda=t.gae_lambda,
        clip_range=t.clip_range,
        ent_coef=t.ent_coef,
        vf_coef=t.vf_coef,
        max_grad_norm=t.max_grad_norm,
        normalize_advantage=True,
        stats_window_size=num_envs,
        policy_kwargs=dict(
            obs_dim=obs_dim,
            state_dim=state_dim,
            critic_input="local+state" if t.algorithm == "mappo" else "local",
            layer_norm=t.layer_norm,
            value_norm=t.value_norm,
            net_arch=dict(pi=list(t.hidden), vf=list(t.hidden)),
            actor=t.actor,
            set_layout=set_layout(spec) if t.actor == "set" else None,
            optimizer_kwargs=dict(eps=t.adam_eps),
        ),
        device=resolve_device(t.device),
    )


def new_mappo(cfg, env, seed: int | None = None) -> MAPPO:
    """A fresh MAPPO (or IPPO, per `train.algorithm`) model for a MultiAgentVecEnv, possibly
    wrapped (e.g. in VecMonitor), with the config's hyper-parameters and device."""
    raw = env.unwrapped
    kw = mappo_kwargs(cfg.train, raw.obs_dim, raw.state_dim, raw.num_envs, ObsSpec.from_config(cfg))
    return MAPPO(MAPPOPolicy, env, seed=cfg.seed if seed is None else seed, **kw)
