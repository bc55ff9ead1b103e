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
3. An actor whose users decide in turn (`env.in_turn`) drives in turn, and is fitted with the
   turn blocks its teacher's joint action implies (the moves of the users before each one), so a
   centralized teacher's joint assignment can be followed user by user.
4. The critic is fitted to TD(lambda) returns of the student's last batch (targets refreshed
   `critic_rounds` times), with the value normalizer updated first, so the first PPO updates
   see meaningful advantages instead of an untrained critic's noise.
"""

from __future__ import annotations

import logging

import torch

from marl_sd.agents.evaluate import HEADLINE, run_policy
from marl_sd.agents.heuristics import make_heuristic
from marl_sd.agents.mappo import MAPPO
from marl_sd.agents.policy import PolicyContext
from marl_sd.config import Config
from marl_sd.contract import TurnOrder
from marl_sd.envs.vec_env import MultiAgentVecEnv

log = logging.getLogger(__name__)


def smoothed_onehot(a: torch.Tensor, m: torch.Tensor, smoothing: float) -> torch.Tensor:
    """One sub-action's target: (1-s) one-hot of `a` + s uniform over the valid choices `m`."""
    uniform = m.float() / m.float().sum(-1, keepdim=True).clamp(min=1)
    return (1 - smoothing) * torch.nn.functional.one_hot(a, m.shape[-1]).float() + smoothing * uniform


def masked_ce(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, nvec: list[int]) -> torch.Tensor:
    """Mean over rows and sub-actions of the cross-entropy of the masked softmax to `target`
    (a distribution over each sub-action's choices)."""
    total = logits.new_zeros(())
    for z, m, q in zip(torch.split(logits, nvec, -1), torch.split(mask.bool(), nvec, -1), torch.split(target, nvec, -1)):
        logp = torch.where(m, torch.log_softmax(torch.where(m, z, torch.finfo(z.dtype).min), -1), 0.0)
        total = total - (q * logp).sum(-1).mean()
    return total / len(nvec)


def smoothed_masked_ce(
    logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, nvec: list[int], smoothing: float
) -> torch.Tensor:
    """Mean over rows and sub-actions of the cross-entropy to (1-s)*onehot + s*uniform(valid)."""
    q = [smoothed_onehot(a, m, smoothing) for m, a in zip(torch.split(mask.bool(), nvec, -1), target.unbind(-1))]
    return masked_ce(logits, mask, torch.cat(q, -1), nvec)


def choose_teachers(cfg: Config, venv: MultiAgentVecEnv, episodes: int = 2) -> list[str]:
    """Per training part (size or physics): the candidate heuristic (`train.pretrain.candidates`)
    with the lowest all-work ms/token there, simulated on `episodes` episodes of its own seed."""
    out = []
    for k, part in enumerate(venv.parts):
        scores = {}
        for name in cfg.train.pretrain.candidates:
            s, _ = run_policy(
                part.cfg, make_heuristic(name, PolicyContext.from_config(part.cfg)), seed=50_000 + k, episodes=episodes
            )
            scores[name] = s[HEADLINE]
        best = min(scores, key=scores.get)
        log.info("teacher for %s: %s (%s)", part.cfg.name, best, ", ".join(f"{n} {v:.1f}" for n, v in scores.items()))
        out.append(best)
    return out


class Kickstart:
    """Runs the pretraining phase on a fresh model; returns what it measured."""

    def __init__(self, cfg: Config, model: MAPPO, venv: MultiAgentVecEnv):
        self.cfg, self.p, self.model, self.venv = cfg, cfg.train.pretrain, model, venv
        self.teachers = choose_teachers(cfg, venv) if self.p.teacher == "auto" else [self.p.teacher] * len(venv.parts)
        self.parts = [
            (part.sim, make_heuristic(name, PolicyContext.from_config(part.cfg, part.sim.spec)))
            for part, name in zip(venv.parts, self.teachers)
        ]  # one teacher per training size or physics, reading the observations as that simulator encodes them
        self.ctx = PolicyContext.from_config(cfg)
        self.policy = model.policy
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.turns = TurnOrder(self.ctx.spec) if self.ctx.spec.in_turn else None

    def _episodes(self, student_drives: bool) -> list[dict]:
        return [self._episode(sim, teacher, student_drives) for sim, teacher in self.parts]

    def _episode(self, sim, teacher, student_drives: bool):
        """One batch of full episodes: local obs, global state, masks, teacher labels, rewards."""
        sim.reset()
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "state", "mask", "label", "reward", "agree")}
        for _ in range(sim.horizon):
            local, state = sim.obs_and_state()
            mask = sim.mask
            label = teacher.act(local, mask)
            with torch.no_grad():
                own = self._own(local, mask).view_as(label)
            reward, _ = sim.step(own if student_drives else label)
            for k, v in (
                ("obs", local),
                ("state", state),
                ("mask", mask),
                ("label", label),
                ("reward", reward),
                ("agree", (own == label).float()),
            ):
                rows[k].append(v.cpu())
        last_local, last_state = sim.obs_and_state()
        rows["obs"].append(last_local.cpu())
        rows["state"].append(last_state.cpu())
        return {k: torch.stack(v) for k, v in rows.items()}  # [T(+1), B, N, ...]

    def _own(self, local: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The student's greedy actions [B, N, 4] (in turn if it decides in turn)."""
        pol, pick = self.policy, self.ctx.actions.masked_argmax

        def logits(x):
            return pol.actor_logits(x.to(pol.device).float()).cpu()

        if self.turns is not None:
            return self.turns.decide(local.float(), mask, logits, pick)[0]
        return pick(logits(local.reshape(-1, local.shape[-1])), mask.reshape(-1, mask.shape[-1])).view(*local.shape[:-1], -1)

    def _inputs(self, d: dict) -> torch.Tensor:
        """The actor's inputs of a batch's labelled slots: with the turn blocks the labels imply."""
        obs = d["obs"][:-1]
        return obs if self.turns is None else self.turns.fill(obs, d["label"])

    def _fit_actor(self, data: list[dict]) -> float:
        pol, nvec = self.policy, self.ctx.nvec
        obs = torch.cat([self._inputs(d).reshape(-1, d["obs"].shape[-1]) for d in data])
        mask = torch.cat([d["mask"].reshape(-1, d["mask"].shape[-1]) for d in data])
        label = torch.cat([d["label"].reshape(-1, len(nvec)) for d in data])
        params = pol.actor_parameters()
        opt = torch.optim.Adam(params, lr=self.p.learning_rate, eps=self.cfg.train.adam_eps)
        pol.set_training_mode(True)
        loss = torch.zeros(())
        for _ in range(self.p.epochs):
            for idx in torch.randperm(len(obs), generator=self.gen).split(self.p.batch_size):
                logits = pol.actor_logits(obs[idx].to(pol.device))
                loss = smoothed_masked_ce(
                    logits, mask[idx].to(pol.device), label[idx].to(pol.device), nvec, self.p.label_smoothing
                )
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

    def _targets(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """TD(lambda) returns [T * B * N] of one episode batch from the critic itself."""
        pol, t = self.policy, self.cfg.train
        v = pol.predict_values(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1])
        g = torch.empty_like(r)
        nxt = v[-1]
        for k in range(r.shape[0] - 1, -1, -1):
            nxt = r[k] + t.gamma * ((1 - t.gae_lambda) * v[k + 1] + t.gae_lambda * nxt)
            g[k] = nxt
        return g.reshape(-1)

    def _fit_critic(self, batches: list[dict]) -> float:
        """TD(lambda) targets from the critic itself (the horizon is bootstrapped, as in PPO)."""
        pol, t = self.policy, self.cfg.train
        xs = [self._critic_inputs(d).to(pol.device) for d in batches]
        rs = [d["reward"].to(pol.device) for d in batches]
        flat_x = torch.cat([x[:-1].reshape(-1, x.shape[-1]) for x in xs])
        params = pol.critic_parameters()
        opt = torch.optim.Adam(params, lr=self.p.learning_rate, eps=t.adam_eps)
        vn = pol.value_normalizer
        loss = torch.zeros(())
        for _ in range(self.p.critic_rounds):
            with torch.no_grad():
                target = torch.cat([self._targets(x, r) for x, r in zip(xs, rs)])
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
        data, stats = [], {"teacher": self.p.teacher, "teachers": self.teachers, "iterations": []}
        for it in range(self.p.iterations):
            ds = self._episodes(student_drives=it > 0)
            data.extend(ds)
            actor_loss = self._fit_actor(data)
            row = {
                "iteration": it,
                "driver": "student" if it else "teacher",
                "agreement": float(torch.stack([d["agree"].mean() for d in ds]).mean()),
                "reward": float(torch.stack([d["reward"].mean() for d in ds]).mean()),
                "actor_loss": actor_loss,
            }
            stats["iterations"].append(row)
            log.info(
                "pretrain %d (%s drives): agreement with %s %.3f, reward %.4f, CE %.4f",
                it,
                row["driver"],
                self.p.teacher,
                row["agreement"],
                row["reward"],
                actor_loss,
            )
            if progress is not None:
                progress(it + 1, self.p.iterations, row)
        if self.p.critic_rounds:
            stats["critic_loss"] = self._fit_critic(self._episodes(student_drives=True))
        for sim, _ in self.parts:
            sim.reset()
        return stats
