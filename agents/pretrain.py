"""Kickstarting: behaviour cloning of a heuristic teacher before PPO (`train.pretrain`).

PPO from scratch spends most of a short CPU budget relearning what a latency model already
knows (which server is near, which gamma suits this device). Cloning a heuristic first starts
PPO from that policy, so the budget goes to improving on it:

1. Episode batches on the training simulator; the first is driven by the teacher, later ones by
   the student's own greedy actions (DAgger), and every visited state is labelled with the
   teacher's action, so the student also learns how to recover from its own mistakes.
2. After each batch the actor is fitted to all labels so far with a label-smoothed masked
   cross-entropy per sub-action (smoothing keeps probability on the other valid actions for
   PPO to explore).
3. The critic is fitted to TD(lambda) returns of the student's last batch (targets refreshed
   `critic_rounds` times), with the value normalizer updated first, so the first PPO updates
   see meaningful advantages instead of an untrained critic's noise.
"""
from __future__ import annotations

import logging

import torch

from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.mappo import MAPPO
from marl_sd.agents.policy import PolicyContext
from marl_sd.config import Config
from marl_sd.envs.vec_env import MultiAgentVecEnv

log = logging.getLogger(__name__)


def smoothed_masked_ce(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                       nvec: list[int], smoothing: float) -> torch.Tensor:
    """Mean over rows and sub-actions of the cross-entropy to (1-s)*onehot + s*uniform(valid)."""
    total = logits.new_zeros(())
    for z, m, a in zip(torch.split(logits, nvec, -1), torch.split(mask.bool(), nvec, -1), target.unbind(-1)):
        logp = torch.log_softmax(torch.where(m, z, torch.finfo(z.dtype).min), -1)
        logp = torch.where(m, logp, 0.0)
        uniform = m.float() / m.float().sum(-1, keepdim=True).clamp(min=1)
        q = (1 - smoothing) * torch.nn.functional.one_hot(a, z.shape[-1]).float() + smoothing * uniform
        total = total - (q * logp).sum(-1).mean()
    return total / len(nvec)


class Kickstart:
    """Runs the pretraining phase on a fresh model; returns what it measured."""

    def __init__(self, cfg: Config, model: MAPPO, venv: MultiAgentVecEnv):
        self.cfg, self.p, self.model, self.venv = cfg, cfg.train.pretrain, model, venv
        self.ctx = PolicyContext.from_config(cfg)
        self.teacher = make_heuristic(self.p.teacher, self.ctx)
        self.policy = model.policy
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _episode(self, student_drives: bool):
        """One batch of full episodes: local obs, global state, masks, teacher labels, rewards."""
        sim, pol = self.venv.sim, self.policy
        sim.reset()
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "state", "mask", "label", "reward", "agree")}
        for _ in range(sim.horizon):
            local, state = sim.obs_and_state()
            mask = sim.mask
            label = self.teacher.act(local, mask)
            with torch.no_grad():
                logits = pol.actor_logits(local.reshape(-1, local.shape[-1]).to(pol.device).float()).cpu()
            own = self.ctx.actions.masked_argmax(logits, mask.reshape(-1, mask.shape[-1])).view_as(label)
            reward, _ = sim.step(own if student_drives else label)
            for k, v in (("obs", local), ("state", state), ("mask", mask), ("label", label), ("reward", reward),
                         ("agree", (own == label).float())):
                rows[k].append(v.cpu())
        last_local, last_state = sim.obs_and_state()
        rows["obs"].append(last_local.cpu())
        rows["state"].append(last_state.cpu())
        return {k: torch.stack(v) for k, v in rows.items()}  # [T(+1), B, N, ...]

    def _fit_actor(self, data: list[dict]) -> float:
        pol, nvec = self.policy, self.ctx.nvec
        obs = torch.cat([d["obs"][:-1].reshape(-1, d["obs"].shape[-1]) for d in data])
        mask = torch.cat([d["mask"].reshape(-1, d["mask"].shape[-1]) for d in data])
        label = torch.cat([d["label"].reshape(-1, len(nvec)) for d in data])
        params = list(pol.mlp_extractor.policy_net.parameters()) + list(pol.action_net.parameters())
        opt = torch.optim.Adam(params, lr=self.p.learning_rate, eps=self.cfg.train.adam_eps)
        pol.set_training_mode(True)
        loss = torch.zeros(())
        for _ in range(self.p.epochs):
            for idx in torch.randperm(len(obs), generator=self.gen).split(self.p.batch_size):
                logits = pol.actor_logits(obs[idx].to(pol.device))
                loss = smoothed_masked_ce(logits, mask[idx].to(pol.device), label[idx].to(pol.device), nvec,
                                          self.p.label_smoothing)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
                opt.step()
        pol.set_training_mode(False)
        return float(loss.detach())

    def _critic_inputs(self, d: dict) -> torch.Tensor:
        T1, B, N, _ = d["obs"].shape
        state = d["state"].unsqueeze(2).expand(T1, B, N, d["state"].shape[-1])
        return torch.cat([d["obs"], state], -1)

    def _fit_critic(self, d: dict) -> float:
        """TD(lambda) targets from the critic itself (the horizon is bootstrapped, as in PPO)."""
        pol, t = self.policy, self.cfg.train
        x = self._critic_inputs(d).to(pol.device)
        r = d["reward"].to(pol.device)
        flat_x = x[:-1].reshape(-1, x.shape[-1])
        params = list(pol.mlp_extractor.value_net.parameters()) + list(pol.value_net.parameters())
        opt = torch.optim.Adam(params, lr=self.p.learning_rate, eps=t.adam_eps)
        vn = pol.value_normalizer
        loss = torch.zeros(())
        for _ in range(self.p.critic_rounds):
            with torch.no_grad():
                v = pol.predict_values(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1])
                g = torch.empty_like(r)
                nxt = v[-1]
                for k in range(r.shape[0] - 1, -1, -1):
                    nxt = r[k] + t.gamma * ((1 - t.gae_lambda) * v[k + 1] + t.gae_lambda * nxt)
                    g[k] = nxt
            target = g.reshape(-1)
            scale = 1.0
            if vn is not None:
                vn.update(target)
                scale = 1.0 / vn.stats()[1]
            pol.set_training_mode(True)
            for _ in range(self.p.epochs):
                for idx in torch.randperm(len(flat_x), generator=self.gen).split(self.p.batch_size):
                    pred = pol.predict_values(flat_x[idx]).flatten()
                    loss = scale * torch.nn.functional.mse_loss(pred, target[idx])
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                    opt.step()
            pol.set_training_mode(False)
        return float(loss.detach())

    def run(self, progress=None) -> dict:
        data, stats = [], {"teacher": self.p.teacher, "iterations": []}
        for it in range(self.p.iterations):
            d = self._episode(student_drives=it > 0)
            data.append(d)
            actor_loss = self._fit_actor(data)
            row = {"iteration": it, "driver": "student" if it else "teacher",
                   "agreement": float(d["agree"].mean()), "reward": float(d["reward"].mean()),
                   "actor_loss": actor_loss}
            stats["iterations"].append(row)
            log.info("pretrain %d (%s drives): agreement with %s %.3f, reward %.4f, CE %.4f", it, row["driver"],
                     self.p.teacher, row["agreement"], row["reward"], actor_loss)
            if progress is not None:
                progress(it + 1, self.p.iterations, row)
        if self.p.critic_rounds:
            stats["critic_loss"] = self._fit_critic(self._episode(student_drives=True))
        self.venv.sim.reset()
        return stats
