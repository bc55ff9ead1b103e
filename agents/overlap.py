"""Simulation overlapped with learning (`train.overlap`): a collector process steps the
simulator on one core while the learner runs PPO epochs on the other.

Pipeline, one rollout deep: while the learner updates θ_k on rollout k+1, the collector
gathers rollout k+2 with θ_k (its weights arrive through shared memory), so every rollout is
trained on one update after the policy that collected it. PPO's ratio is taken against the
behaviour policy's own log-probabilities (what the collector sampled with) and clipped as
usual, as asynchronous PPO does; values and the truncation bootstrap are recomputed by the
learner's current critic in one batched forward. The lag's effect on quality is measured in
`docs/training.md`, not assumed.

Exact resume: at a rollout boundary the collector is idle and the checkpoint holds, beside
the model, the collector's simulator state and random stream and the rollout it delivered
but the learner has not trained on yet; a resumed run continues bit-identically.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.multiprocessing as mp
from stable_baselines3.common.vec_env import VecEnvWrapper, VecMonitor

from marl_sd.config import Config
from marl_sd.envs.vec_env import training_env

STATE_VERSION = 1
COLLECTOR_SEED_OFFSET = 1_000_003  # the collector's sampling stream: seed + this


@dataclass
class Rollout:
    """One collected rollout, [n_steps, n_slots, ...] arrays, plus what happened at episode ends."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    starts: np.ndarray
    log_probs: np.ndarray
    masks: np.ndarray
    dones: np.ndarray
    last_obs: np.ndarray
    truncations: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (step, slots, terminal obs)
    episodes: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _shared(n_steps: int, n: int, obs_dim: int, n_heads: int, mask_dim: int) -> dict[str, torch.Tensor]:
    z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt).share_memory_()  # noqa: E731
    return {
        "obs": z(n_steps, n, obs_dim),
        "actions": z(n_steps, n, n_heads, dt=torch.int64),
        "rewards": z(n_steps, n),
        "starts": z(n_steps, n),
        "log_probs": z(n_steps, n),
        "masks": z(n_steps, n, mask_dim, dt=torch.bool),
        "dones": z(n_steps, n, dt=torch.bool),
        "last_obs": z(n, obs_dim),
    }


def _collector(cfg: Config, num_envs: int, n_steps: int, policy, weights: dict, buf: dict, conn, start: dict) -> None:
    """The collector process: waits for `collect`, steps `n_steps` slots with the weights in
    shared memory, writes the rollout into `buf` and answers with the small remainder."""
    torch.set_num_threads(1)
    raw = training_env(cfg, num_envs)
    raw.set_state(start["env"])
    venv = VecMonitor(raw)
    torch.set_rng_state(start["torch_rng"])
    obs, starts = start["obs"], start["starts"]
    policy.set_training_mode(False)
    while True:
        msg = conn.recv()
        if msg == "close":
            return
        if msg == "state":
            conn.send({"env": raw.get_state(), "torch_rng": torch.get_rng_state(), "obs": obs, "starts": starts})
            continue
        policy.load_state_dict(weights)
        truncations, episodes = [], []
        for t in range(n_steps):
            masks = raw.action_masks()
            with torch.no_grad():
                dist = policy.get_distribution(torch.as_tensor(obs), action_masks=masks)
                actions = dist.get_actions(deterministic=False)
                log_probs = dist.log_prob(actions)
            buf["obs"][t] = torch.as_tensor(obs)
            buf["actions"][t] = actions.view(len(obs), -1)
            buf["log_probs"][t] = log_probs
            buf["masks"][t] = torch.as_tensor(masks)
            buf["starts"][t] = torch.as_tensor(starts, dtype=torch.float32)
            obs, rewards, dones, infos = venv.step(actions.numpy())
            buf["rewards"][t] = torch.as_tensor(rewards)
            buf["dones"][t] = torch.as_tensor(dones)
            idx = [i for i in np.flatnonzero(dones) if infos[i].get("TimeLimit.truncated", False)]
            if idx:
                truncations.append((t, np.asarray(idx), np.stack([infos[i]["terminal_observation"] for i in idx])))
            episodes += [infos[i]["episode"] for i in np.flatnonzero(dones) if "episode" in infos[i]]
            starts = dones
        buf["last_obs"].copy_(torch.as_tensor(obs))
        conn.send({"truncations": truncations, "episodes": episodes, "metrics": raw.pop_metrics()})


class OverlappedVecEnv(VecEnvWrapper):
    """The training env as the learner sees it under `train.overlap`: spaces, `reset` and the
    pre-training episodes come from the in-process env until the first rollout; rollouts then
    come from a collector process (`start`, `collect`, `wait`). `get_state`/`set_state` carry
    the collector's state and the pending rollout through exact checkpoints."""

    def __init__(self, venv, cfg: Config, num_envs: int, n_steps: int):
        super().__init__(venv)
        self.cfg, self.B, self.n_steps = cfg, num_envs, n_steps
        self.proc = self.conn = self.buf = self.weights = None
        self.pending: Rollout | None = None
        self.in_flight = False
        self.restored: dict | None = None
        self.last_metrics: dict[str, float] = {}

    # ---- VecEnv plumbing (the learner never steps this env itself)
    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        raise RuntimeError("an overlapped env is stepped by its collector process, not by step()")

    def pop_metrics(self) -> dict[str, float]:
        out, self.last_metrics = self.last_metrics, {}
        return out

    @property
    def unwrapped(self):
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None

    # ---- the collector
    def start(self, policy, obs: np.ndarray, starts: np.ndarray) -> None:
        """Spawn the collector from the in-process env's state (or a restored checkpoint's)."""
        if self.restored is not None:
            start, self.pending = self.restored["collector"], self.restored["pending"]
            self.restored = None
        else:
            rng = torch.Generator().manual_seed(self.cfg.seed + COLLECTOR_SEED_OFFSET).get_state()
            start = {"env": self.venv.get_state(), "torch_rng": rng, "obs": obs, "starts": starts}
        n, obs_dim = int(self.num_envs), int(self.observation_space.shape[0])
        nvec = self.action_space.nvec
        self.buf = _shared(self.n_steps, n, obs_dim, len(nvec), int(sum(nvec)))
        self.weights = {k: v.detach().clone().cpu().share_memory_() for k, v in policy.state_dict().items()}
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_collector,
            # a copy on the CPU (the collector steps the simulator there): tensors handed to a child
            # move into shared memory, and the learner's own parameters must not be the ones the
            # collector reads while they are being updated
            args=(self.cfg, self.B, self.n_steps, copy.deepcopy(policy).cpu(), self.weights, self.buf, child, start),
            daemon=True,
            name="marl-sd-collector",
        )
        self.proc.start()
        child.close()

    def collect(self, policy) -> None:
        """Hand the collector the learner's current weights and start the next rollout; the
        delivered one is the learner's from now on."""
        if self.in_flight:
            raise RuntimeError("a rollout is already in flight")
        for k, v in policy.state_dict().items():
            self.weights[k].copy_(v)
        self.pending = None
        self.conn.send("collect")
        self.in_flight = True

    def _recv(self):
        try:
            if not self.conn.poll(None):
                raise EOFError
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            code = self.proc.exitcode if self.proc is not None else None
            raise RuntimeError(f"the collector process died (exit code {code}); see its traceback above") from None

    def _receive(self) -> None:
        small = self._recv()
        self.in_flight = False
        self.pending = Rollout(**{k: v.numpy().copy() for k, v in self.buf.items()}, **small)

    def wait(self) -> Rollout:
        """The delivered rollout (restored from a checkpoint, or the one in flight when it lands)."""
        if self.pending is None:
            if not self.in_flight:
                raise RuntimeError("no rollout in flight: call collect() first")
            self._receive()
        return self.pending

    # ---- exact checkpoints
    def get_state(self) -> dict:
        """The collector's state at a rollout boundary and the rollout not yet trained on."""
        if not self.running:
            return self.restored or {"version": STATE_VERSION, "in_process": self.venv.get_state()}
        if self.in_flight:
            self._receive()
        self.conn.send("state")
        return {"version": STATE_VERSION, "collector": self._recv(), "pending": self.pending}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError("this checkpoint was not written by an overlapped run (train.overlap): resume with the same setting")
        if "in_process" in state:
            self.venv.set_state(state["in_process"])
        else:
            self.restored = state

    def close(self) -> None:
        if self.proc is not None:
            if self.in_flight:  # a rollout nobody will train on
                self.proc.kill()
            else:
                try:
                    self.conn.send("close")
                except (BrokenPipeError, OSError):
                    pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
            self.proc = None
        self.venv.close()
